//! The layering of `src/`, checked by reading the source.
//!
//! The rules are the three constants below: change them here when the layering changes, and
//! say why in docs/ARCHITECTURE.md. Every violation is reported with its file and line.
//!
//! A module is a folder of `src/` (`src/view/ops.rs` belongs to `view`); `lib.rs` and
//! `main.rs` are the crate's face and may name anything. A module names another by a path
//! starting `crate::` (in a `use` tree or inline), by `super::` climbing out of its folder, or,
//! in `main.rs`, by `ferryfs::`. Comments and string literals are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the face down to the stores. A module may name modules of any layer below its
/// own and none of its own layer or above: so the imports form a DAG with no loop.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["daemon"],
    &["control", "observe"],
    &["fuse", "lifecycle"],
    &["state"],
    &["workers"],
    &["copier"],
    &["view"],
    &["journal"],
    &["store", "metrics"],
];

/// External crates that only one place may name: (crate, the folder or file that may).
const CONFINED: &[(&str, &str)] = &[
    ("fuser", "src/fuse/"),
    ("rocksdb", "src/journal/rocks.rs"),
    ("aws_sdk_s3", "src/store/"),
    ("aws_config", "src/store/"),
    ("aws_smithy_types", "src/store/"),
    ("aws_smithy_runtime_api", "src/store/"),
];

/// Source files that are the crate's face, not a module of it.
const FACE: &[&str] = &["src/lib.rs", "src/main.rs"];

/// One reference from a file to a module of the crate, or to an external crate.
#[derive(Debug, Clone)]
struct Ref {
    file: String,
    line: usize,
    target: String,
}

fn main_dir() -> PathBuf {
    let dir = option_env!("CARGO_MANIFEST_DIR").unwrap_or(".");
    PathBuf::from(dir)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, string literals and char literals blanked out (newlines kept, so
/// line numbers stay right).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let keep_newlines = |out: &mut Vec<u8>, seg: &[u8]| {
        out.extend(seg.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            keep_newlines(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            // Block comments nest in Rust.
            let (mut depth, mut j) = (0usize, 0);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            keep_newlines(&mut out, &rest[..j]);
            i += j;
        } else if let Some(len) = raw_string_len(b, i) {
            keep_newlines(&mut out, &b[i..i + len]);
            i += len;
        } else if b[i] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            keep_newlines(&mut out, &rest[..(j + 1).min(rest.len())]);
            i += j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('a', '\n', '\u{..}'); a lifetime ('a) is left alone.
            let close = rest.iter().skip(1).take(12).position(|&c| c == b'\'');
            match close {
                Some(n) if n == 1 || rest[1] == b'\\' => {
                    keep_newlines(&mut out, &rest[..n + 2]);
                    i += n + 2;
                }
                _ => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("stripped source stays UTF-8")
}

/// Length of a raw string literal (`r"..."`, `r#"..."#`, `br"..."`) starting at `i`, if one does.
fn raw_string_len(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'b') {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    j += hashes;
    if b.get(j) != Some(&b'"') {
        return None;
    }
    j += 1;
    let mut close = vec![b'"'];
    close.extend(std::iter::repeat_n(b'#', hashes));
    while j < b.len() {
        if b[j..].starts_with(&close) {
            return Some(j + close.len() - i);
        }
        j += 1;
    }
    Some(b.len() - i)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Every path in `code` that starts with `prefix` followed by `::`, at an identifier boundary,
/// with the byte offset just after the `::`.
fn paths_after(code: &str, prefix: &str) -> Vec<usize> {
    let pat = format!("{prefix}::");
    let b = code.as_bytes();
    code.match_indices(&pat)
        .map(|(i, _)| i)
        .filter(|&i| i == 0 || !(is_ident(b[i - 1]) || b[i - 1] == b':'))
        .map(|i| i + pat.len())
        .collect()
}

/// The identifiers that a path continuing at `at` names first: `view` for `view::X`, and each
/// branch's first name for a `{a, b::c}` use tree.
fn first_names(code: &str, at: usize) -> Vec<String> {
    let b = code.as_bytes();
    let mut i = at;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if b.get(i) == Some(&b'{') {
        // Split the group at its top-level commas.
        let (mut depth, mut j, mut start) = (0usize, i, i + 1);
        let mut names = Vec::new();
        while j < b.len() {
            match b[j] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        names.extend(ident_at(code, start));
                        break;
                    }
                }
                b',' if depth == 1 => {
                    names.extend(ident_at(code, start));
                    start = j + 1;
                }
                _ => {}
            }
            j += 1;
        }
        names
    } else {
        ident_at(code, i).into_iter().collect()
    }
}

fn ident_at(code: &str, at: usize) -> Option<String> {
    let b = code.as_bytes();
    let mut i = at;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let end = (i..b.len()).find(|&j| !is_ident(b[j])).unwrap_or(b.len());
    (end > i).then(|| code[i..end].to_string())
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].bytes().filter(|&c| c == b'\n').count() + 1
}

/// The module a file belongs to: its first folder under `src/`, or its stem for a file
/// directly in `src/`.
fn module_of(rel: &str) -> String {
    let inner = rel.strip_prefix("src/").unwrap_or(rel);
    match inner.split_once('/') {
        Some((dir, _)) => dir.to_string(),
        None => inner.trim_end_matches(".rs").to_string(),
    }
}

/// The folders of `rel`'s module path below `src/` (`src/view/ops.rs` -> [view, ops];
/// `src/view/mod.rs` -> [view]): what `super::` climbs out of.
fn module_path(rel: &str) -> Vec<String> {
    let inner = rel
        .strip_prefix("src/")
        .unwrap_or(rel)
        .trim_end_matches(".rs");
    let mut parts: Vec<String> = inner.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// What a file names: crate modules (as `crate::NAME`) and external crates (as `NAME`).
fn references(rel: &str, code: &str) -> Vec<Ref> {
    let mut refs = Vec::new();
    let mut add = |at: usize, target: String| {
        refs.push(Ref {
            file: rel.to_string(),
            line: line_of(code, at),
            target,
        })
    };
    for at in paths_after(code, "crate") {
        for name in first_names(code, at) {
            add(at, format!("crate::{name}"));
        }
    }
    if rel == "src/main.rs" {
        for at in paths_after(code, "ferryfs") {
            for name in first_names(code, at) {
                add(at, format!("crate::{name}"));
            }
        }
    }
    // `super::` chains: count the climbs, then resolve against the file's module path.
    let path = module_path(rel);
    for at in paths_after(code, "super") {
        // paths_after skips a `super` preceded by `::`, so this is the first of a chain.
        let mut ups = 1;
        let mut i = at;
        while code[i..].starts_with("super::") {
            ups += 1;
            i += "super::".len();
        }
        if ups >= path.len() {
            for name in first_names(code, i) {
                add(at, format!("crate::{name}"));
            }
        }
    }
    for (krate, _) in CONFINED {
        for at in paths_after(code, krate) {
            add(at, krate.to_string());
        }
        // `extern crate x` and `use x as y` both still write `x`; `use x::...` is caught above.
    }
    refs
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

struct Source {
    rel: String,
    code: String,
}

fn sources() -> Vec<Source> {
    let root = main_dir();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(
        !files.is_empty(),
        "no Rust files found under {}/src",
        root.display()
    );
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let src = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {rel}: {e}"));
            Source {
                rel,
                code: strip(&src),
            }
        })
        .collect()
}

/// Module-to-module edges, each with the places that make it.
fn module_graph(srcs: &[Source]) -> BTreeMap<(String, String), Vec<(String, usize)>> {
    let mut edges: BTreeMap<(String, String), Vec<(String, usize)>> = BTreeMap::new();
    for s in srcs {
        if FACE.contains(&s.rel.as_str()) {
            continue;
        }
        let from = module_of(&s.rel);
        for r in references(&s.rel, &s.code) {
            if let Some(to) = r.target.strip_prefix("crate::")
                && to != from
                && layer_of(to).is_some()
            {
                edges
                    .entry((from.clone(), to.to_string()))
                    .or_default()
                    .push((r.file, r.line));
            }
        }
    }
    edges
}

/// Every import loop among modules, as a cycle of modules, each step with one place making it.
fn loops(edges: &BTreeMap<(String, String), Vec<(String, usize)>>) -> Vec<String> {
    let mut out = BTreeSet::new();
    let nodes: BTreeSet<&String> = edges.keys().flat_map(|(a, b)| [a, b]).collect();
    for start in &nodes {
        // Depth-first search for a path back to `start` through nodes ordered after it, so
        // each loop is reported once, from its smallest module.
        let mut stack = vec![(start.to_string(), vec![start.to_string()])];
        while let Some((at, path)) = stack.pop() {
            for ((a, b), _) in edges.range((at.clone(), String::new())..) {
                if *a != at {
                    break;
                }
                if b == *start {
                    let mut steps = Vec::new();
                    let mut full = path.clone();
                    full.push(b.clone());
                    for w in full.windows(2) {
                        let (f, l) = &edges[&(w[0].clone(), w[1].clone())][0];
                        steps.push(format!("{} -> {} ({f}:{l})", w[0], w[1]));
                    }
                    out.insert(format!("import loop: {}", steps.join(", ")));
                } else if b > *start && !path.contains(b) {
                    let mut p = path.clone();
                    p.push(b.clone());
                    stack.push((b.clone(), p));
                }
            }
        }
    }
    out.into_iter().collect()
}

#[test]
fn the_rules_name_each_module_once_and_every_module_has_a_layer() {
    let mut seen = BTreeSet::new();
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(seen.insert(*m), "{m} is in LAYERS twice");
    }
    let root = main_dir().join("src");
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&root).expect("src/") {
        let p = e.expect("entry").path();
        let rel = format!("src/{}", p.file_name().unwrap().to_string_lossy());
        if FACE.contains(&rel.as_str()) {
            continue;
        }
        let m = module_of(&rel);
        if p.is_file() {
            missing.push(format!(
                "{rel}: a file directly in src/ (each part is a folder)"
            ));
        } else if layer_of(&m).is_none() {
            missing.push(format!("{rel}/: module {m} has no layer in LAYERS"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn imports_form_no_loop_and_point_only_downwards() {
    let srcs = sources();
    let edges = module_graph(&srcs);
    let mut bad = loops(&edges);
    for ((from, to), places) in &edges {
        let (lf, lt) = (layer_of(from), layer_of(to));
        let (Some(lf), Some(lt)) = (lf, lt) else {
            continue;
        };
        if lt <= lf {
            for (f, l) in places {
                let why = if lt == lf {
                    "the same layer"
                } else {
                    "a higher layer"
                };
                bad.push(format!("{f}:{l}: {from} names {to}, which is in {why}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "layering broken (rules: LAYERS in tests/architecture.rs):\n{}",
        bad.join("\n")
    );
}

#[test]
fn confined_crates_are_named_only_where_allowed() {
    let mut bad = Vec::new();
    for s in sources() {
        for r in references(&s.rel, &s.code) {
            if let Some((krate, home)) = CONFINED.iter().find(|(k, _)| *k == r.target)
                && !s.rel.starts_with(home)
            {
                bad.push(format!(
                    "{}:{}: names {krate}, which only {home} may",
                    r.file, r.line
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    // The reader itself: a loop, a confined crate and a super:: climb, in code it is given.
    let code = strip(
        "// crate::journal in a comment\nuse crate::{view::{View, Kind}, journal};\nfn f() { let s = \"crate::cli\"; fuser::Session::new(); super::super::copier::x(); }\n",
    );
    let refs = references("src/view/ops.rs", &code);
    let targets: Vec<_> = refs.iter().map(|r| (r.target.as_str(), r.line)).collect();
    assert_eq!(
        targets,
        vec![
            ("crate::view", 2),
            ("crate::journal", 2),
            ("crate::copier", 3),
            ("fuser", 3)
        ],
        "{refs:?}"
    );
    let mut edges = BTreeMap::new();
    edges.insert(
        ("a".to_string(), "b".to_string()),
        vec![("src/a/x.rs".to_string(), 1)],
    );
    edges.insert(
        ("b".to_string(), "a".to_string()),
        vec![("src/b/y.rs".to_string(), 2)],
    );
    assert_eq!(
        loops(&edges),
        vec!["import loop: a -> b (src/a/x.rs:1), b -> a (src/b/y.rs:2)"]
    );
}
