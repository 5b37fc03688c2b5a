//! What moves: `prepare --exclude/--include/--filter-from`, with rsync's pattern rules.
//!
//! Rules are tried in the order given and the first that matches decides; an entry no rule
//! matches moves. A pattern:
//! - `*` matches any run of bytes but `/`, `**` any run including `/`, `?` one byte but `/`,
//!   `[...]` one byte of a set (`[!...]` or `[^...]` negated, ranges `a-z`), `\` quotes the
//!   next byte;
//! - a leading `/` anchors it at the dataset's root; otherwise a pattern holding a `/` (not
//!   counting a trailing one) or `**` matches the end of the path at a name boundary, and one
//!   without matches the last name alone;
//! - a trailing `/` matches directories only; a trailing `/***` matches the directory and
//!   everything below it.
//!
//! An excluded directory excludes everything below it (it is not walked, as with rsync: an
//! include rule for an entry below it does not bring that entry back).

use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

/// One rule as given, kept in the migration's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub include: bool,
    /// The pattern's bytes (a name need not be UTF-8).
    #[serde(with = "bytes_text")]
    pub pattern: Vec<u8>,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            if self.include { '+' } else { '-' },
            String::from_utf8_lossy(&self.pattern)
        )
    }
}

/// Patterns are stored as text when they are UTF-8, else as `{"b64": ...}`.
mod bytes_text {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Text(String),
        Bytes { b64: String },
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(t) => Wire::Text(t.to_string()),
            Err(_) => Wire::Bytes {
                b64: base64::engine::general_purpose::STANDARD.encode(v),
            },
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Wire::deserialize(d)? {
            Wire::Text(t) => Ok(t.into_bytes()),
            Wire::Bytes { b64 } => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A rule ready to match.
#[derive(Debug, Clone)]
struct Compiled {
    include: bool,
    /// The pattern without its anchor, trailing `/` or `/***`.
    pat: Vec<u8>,
    anchored: bool,
    dir_only: bool,
    /// Matched against the path's tail (it holds `/` or `**`), not the last name alone.
    whole_path: bool,
    /// `dir/***`: the directory itself and everything below it.
    and_below: bool,
}

/// The rules of a migration, in order.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<Rule>,
    compiled: Vec<Compiled>,
}

impl Filter {
    pub fn new(rules: Vec<Rule>) -> Result<Filter, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        for r in &rules {
            compiled.push(compile(r)?);
        }
        Ok(Filter { rules, compiled })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the rules exclude the entry at `path` (relative to the root, no leading `/`).
    /// Its directories are not looked at: callers walking a tree carry an excluded
    /// directory's verdict down to what is below it.
    pub fn excludes(&self, path: &[u8], is_dir: bool) -> bool {
        for c in &self.compiled {
            if c.dir_only && !is_dir {
                continue;
            }
            if matches(c, path) {
                return !c.include;
            }
        }
        false
    }

    /// Whether the entry at `path` or a directory above it is excluded (for walks that meet
    /// entries out of order, such as an S3 listing).
    pub fn excludes_path(&self, path: &[u8], is_dir: bool) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut at = 0;
        while let Some(i) = path[at..].iter().position(|b| *b == b'/') {
            if self.excludes(&path[..at + i], true) {
                return true;
            }
            at += i + 1;
        }
        self.excludes(path, is_dir)
    }
}

/// The rules as rsync writes them, in order, each quoted.
pub fn rules_display(f: &Filter) -> String {
    f.rules()
        .iter()
        .map(|r| format!("`{r}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The migration's filter, as prepare recorded it (none: nothing excluded).
pub fn load(j: &crate::journal::Records) -> Result<Filter, String> {
    let Some(v) = j
        .meta(crate::journal::Meta::Filter)
        .map_err(|e| e.to_string())?
    else {
        return Ok(Filter::default());
    };
    let rules: Vec<Rule> = serde_json::from_slice(&v).map_err(|e| format!("filter record: {e}"))?;
    Filter::new(rules)
}

/// Record the filter with the migration (prepare; never changed after).
pub fn record(b: &mut crate::journal::Batch, f: &Filter) {
    if !f.is_empty() {
        b.meta(
            crate::journal::Meta::Filter,
            &serde_json::to_vec(f.rules()).expect("rules serialize"),
        );
    }
}

/// Read a `--filter-from` file: one rule a line, `- PATTERN` or `exclude PATTERN`, `+ PATTERN`
/// or `include PATTERN`; blank lines and lines starting with `#` or `;` are skipped. The
/// pattern is the rest of the line after one space, bytes as they are (spaces kept).
pub fn read_filter_file(path: &std::path::Path) -> Result<Vec<Rule>, String> {
    let text = std::fs::read(path).map_err(|e| format!("--filter-from {}: {e}", path.display()))?;
    let mut rules = Vec::new();
    for (n, line) in text.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) || matches!(line[0], b'#' | b';') {
            continue;
        }
        let (include, rest) = if let Some(r) = line.strip_prefix(b"- ") {
            (false, r)
        } else if let Some(r) = line.strip_prefix(b"+ ") {
            (true, r)
        } else if let Some(r) = line.strip_prefix(b"exclude ") {
            (false, r)
        } else if let Some(r) = line.strip_prefix(b"include ") {
            (true, r)
        } else {
            return Err(format!(
                "--filter-from {} line {}: expected `- PATTERN` or `+ PATTERN` (or exclude / \
                 include PATTERN), found {:?}",
                path.display(),
                n + 1,
                String::from_utf8_lossy(line)
            ));
        };
        rules.push(Rule {
            include,
            pattern: rest.to_vec(),
        });
    }
    Ok(rules)
}

/// A rule from the command line.
pub fn rule_arg(include: bool, pattern: &std::ffi::OsStr) -> Rule {
    Rule {
        include,
        pattern: pattern.as_bytes().to_vec(),
    }
}

fn compile(r: &Rule) -> Result<Compiled, String> {
    let mut p: &[u8] = &r.pattern;
    if p.is_empty() {
        return Err(format!("empty filter pattern in rule `{r}`"));
    }
    let anchored = p.first() == Some(&b'/');
    if anchored {
        p = &p[1..];
    }
    let mut and_below = false;
    if let Some(s) = p.strip_suffix(b"/***") {
        and_below = true;
        p = s;
    }
    let mut dir_only = false;
    if !and_below && let Some(s) = p.strip_suffix(b"/") {
        dir_only = true;
        p = s;
    }
    if p.is_empty() {
        return Err(format!("filter pattern `{r}` names no entry"));
    }
    check_brackets(p).map_err(|e| format!("filter pattern `{r}`: {e}"))?;
    let whole_path = p.contains(&b'/') || p.windows(2).any(|w| w == b"**") || and_below;
    Ok(Compiled {
        include: r.include,
        pat: p.to_vec(),
        anchored,
        dir_only,
        whole_path,
        and_below,
    })
}

fn check_brackets(p: &[u8]) -> Result<(), String> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' => i += 2,
            b'[' => match class_end(p, i) {
                Some(end) => i = end + 1,
                None => return Err("a `[` without its `]`".into()),
            },
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index of the `]` closing the class that opens at `open`.
fn class_end(p: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if matches!(p.get(i), Some(b'!' | b'^')) {
        i += 1;
    }
    // A `]` first in the set is a member.
    if p.get(i) == Some(&b']') {
        i += 1;
    }
    while i < p.len() {
        match p[i] {
            b'\\' => i += 2,
            b']' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn matches(c: &Compiled, path: &[u8]) -> bool {
    let at = |tail: &[u8]| {
        if c.and_below {
            // `dir/***`: the directory, or anything below it.
            if wildmatch(&c.pat, tail) {
                return true;
            }
            let mut p = c.pat.clone();
            p.extend_from_slice(b"/**");
            wildmatch(&p, tail)
        } else {
            wildmatch(&c.pat, tail)
        }
    };
    if c.anchored {
        return at(path);
    }
    if !c.whole_path {
        let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
        return wildmatch(&c.pat, name);
    }
    // The end of the path, starting at a name.
    if at(path) {
        return true;
    }
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .any(|(i, _)| at(&path[i + 1..]))
}

/// rsync's wildmatch over bytes: `*` stops at `/`, `**` does not.
fn wildmatch(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    while pi < p.len() {
        match p[pi] {
            b'*' => {
                let double = p.get(pi + 1) == Some(&b'*');
                let mut rest = pi + 1;
                while p.get(rest) == Some(&b'*') {
                    rest += 1;
                }
                let rest = &p[rest..];
                // Try every split of the text; a single star never crosses a `/`.
                let mut k = ti;
                loop {
                    if wildmatch(rest, &t[k..]) {
                        return true;
                    }
                    if k == t.len() || (!double && t[k] == b'/') {
                        return false;
                    }
                    k += 1;
                }
            }
            b'?' => {
                if ti == t.len() || t[ti] == b'/' {
                    return false;
                }
                pi += 1;
                ti += 1;
            }
            b'[' => {
                let Some(end) = class_end(p, pi) else {
                    return false;
                };
                if ti == t.len() || t[ti] == b'/' || !in_class(&p[pi + 1..end], t[ti]) {
                    return false;
                }
                pi = end + 1;
                ti += 1;
            }
            b'\\' if pi + 1 < p.len() => {
                if ti == t.len() || t[ti] != p[pi + 1] {
                    return false;
                }
                pi += 2;
                ti += 1;
            }
            c => {
                if ti == t.len() || t[ti] != c {
                    return false;
                }
                pi += 1;
                ti += 1;
            }
        }
    }
    ti == t.len()
}

fn in_class(set: &[u8], c: u8) -> bool {
    let (negated, set) = match set.first() {
        Some(b'!' | b'^') => (true, &set[1..]),
        _ => (false, set),
    };
    let mut found = false;
    let mut i = 0;
    while i < set.len() {
        let mut lo = set[i];
        if lo == b'\\' && i + 1 < set.len() {
            i += 1;
            lo = set[i];
        }
        if i + 2 < set.len() && set[i + 1] == b'-' {
            let hi = set[i + 2];
            if lo <= c && c <= hi {
                found = true;
            }
            i += 3;
        } else {
            if lo == c {
                found = true;
            }
            i += 1;
        }
    }
    found != negated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(rules: &[&str]) -> Filter {
        Filter::new(
            rules
                .iter()
                .map(|r| Rule {
                    include: r.starts_with('+'),
                    pattern: r.as_bytes()[2..].to_vec(),
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn patterns_follow_rsyncs_rules() {
        // Unanchored, no slash: the last name at any depth.
        let x = f(&["- *.tmp"]);
        assert!(x.excludes(b"a.tmp", false));
        assert!(x.excludes(b"d/e/a.tmp", false));
        assert!(!x.excludes(b"a.tmp.keep", false));
        // `*` does not cross `/`, `**` does.
        let x = f(&["- d/*.o"]);
        assert!(x.excludes(b"d/x.o", false));
        assert!(
            x.excludes(b"top/d/x.o", false),
            "unanchored: the path's end"
        );
        assert!(!x.excludes(b"d/sub/x.o", false));
        let x = f(&["- d/**.o"]);
        assert!(x.excludes(b"d/sub/x.o", false));
        // Anchored.
        let x = f(&["- /build"]);
        assert!(x.excludes(b"build", true));
        assert!(!x.excludes(b"src/build", true));
        // A name boundary: `uild` is no match for `build`.
        let x = f(&["- a/build"]);
        assert!(!x.excludes(b"xa/build", true));
        assert!(x.excludes(b"x/a/build", true));
        // Directories only.
        let x = f(&["- cache/"]);
        assert!(x.excludes(b"cache", true));
        assert!(!x.excludes(b"cache", false));
        // First match wins: include before exclude.
        let x = f(&["+ keep.log", "- *.log"]);
        assert!(!x.excludes(b"keep.log", false));
        assert!(x.excludes(b"other.log", false));
        let x = f(&["+ */", "+ *.txt", "- *"]);
        assert!(!x.excludes(b"d", true));
        assert!(!x.excludes(b"d/a.txt", false));
        assert!(x.excludes(b"d/a.bin", false));
        // `?`, classes, negation, escapes, spaces, bytes that are not UTF-8.
        let x = f(&["- file?.[0-9]", "- [!a-c]x", "- \\*lit"]);
        assert!(x.excludes(b"file1.5", false));
        assert!(!x.excludes(b"file1.a", false));
        assert!(!x.excludes(b"file/.5", false));
        assert!(x.excludes(b"dx", false));
        assert!(!x.excludes(b"bx", false));
        assert!(x.excludes(b"*lit", false));
        assert!(!x.excludes(b"alit", false));
        let x = f(&["- with space*"]);
        assert!(x.excludes(b"d/with space.txt", false));
        let x = Filter::new(vec![Rule {
            include: false,
            pattern: b"caf\xe9*".to_vec(),
        }])
        .unwrap();
        assert!(x.excludes(b"d/caf\xe9 menu", false));
        assert!(!x.excludes(b"d/cafe", false));
        // `dir/***`: the directory and everything below.
        let x = f(&["- /logs/***"]);
        assert!(x.excludes(b"logs", true));
        assert!(x.excludes(b"logs/a/b", false));
        assert!(!x.excludes(b"logs2", true));
        // An excluded directory excludes what is below it, for walks out of order.
        let x = f(&["- tmp/", "+ *.keep"]);
        assert!(x.excludes_path(b"a/tmp/b/c.keep", false));
        assert!(!x.excludes_path(b"a/tmp.keep", false));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_rule() {
        let e = Filter::new(vec![Rule {
            include: false,
            pattern: b"[abc".to_vec(),
        }])
        .unwrap_err();
        assert!(e.contains("[abc"), "{e}");
        assert!(
            Filter::new(vec![Rule {
                include: false,
                pattern: b"/".to_vec()
            }])
            .is_err()
        );
    }

    #[test]
    fn filter_files_read_rsync_forms_and_keep_spaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rules");
        std::fs::write(
            &p,
            b"# comment\n; another\n\n+ keep me.txt\n- *.txt\nexclude /cache/\ninclude x\n",
        )
        .unwrap();
        let r = read_filter_file(&p).unwrap();
        assert_eq!(
            r.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["+ keep me.txt", "- *.txt", "- /cache/", "+ x"]
        );
        std::fs::write(&p, b"*.txt\n").unwrap();
        let e = read_filter_file(&p).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn rules_round_trip_through_the_record() {
        let rules = vec![
            Rule {
                include: true,
                pattern: b"a b".to_vec(),
            },
            Rule {
                include: false,
                pattern: b"caf\xe9".to_vec(),
            },
        ];
        let j = serde_json::to_string(&rules).unwrap();
        assert!(j.contains("\"a b\""), "{j}");
        let back: Vec<Rule> = serde_json::from_str(&j).unwrap();
        assert_eq!(back, rules);
    }
}
