//! The S3 store layer (src/store/s3/) against a real Garage on 127.0.0.1: configuration
//! from AWS's standard environment alone, listing as directories, POSIX metadata written by
//! another client (rclone) and by ferryfs, ranged reads with readahead, and an object
//! replaced while open.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::garage::Garage;
use ferryfs::store::s3::{Listed, ObjectReader, PosixMeta, S3Store, S3Url};

/// The process environment is shared by the tests of this binary: set it once, for one
/// server. Each test works in a bucket of its own.
fn server() -> &'static Garage {
    static PROFILES: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let g = common::garage::shared();
    PROFILES.get_or_init(|| {
        // Profiles of the tests' own: `wrong` has the right key id and a wrong secret.
        let dir = std::env::temp_dir().join(format!("ferryfs-s3-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = dir.join("credentials");
        std::fs::write(
            &creds,
            format!(
                "[wrong]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                g.key_id,
                "0".repeat(64)
            ),
        )
        .unwrap();
        // SAFETY: under the OnceLock, before any store is built, and never changed.
        unsafe { std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &creds) };
        unsafe { std::env::set_var("AWS_CONFIG_FILE", dir.join("config")) };
    });
    g
}

fn store(url: &str) -> Arc<S3Store> {
    Arc::new(S3Store::connect(&S3Url::parse(url).unwrap()).unwrap())
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn a_plain_bucket_url_works_with_only_the_standard_environment() {
    let g = server();
    g.bucket("plain-env");
    // No endpoint, region or path style in the URL: AWS_ENDPOINT_URL, AWS_REGION and the
    // keys come from the environment, and an IP endpoint gets path-style addressing.
    let s = store("s3://plain-env");
    s.put("hello.txt", b"hello".to_vec(), &PosixMeta::default())
        .unwrap();
    let info = s.head("hello.txt").unwrap().expect("the object exists");
    assert_eq!(info.size, 5);
    assert!(!info.etag.is_empty());
    assert!(info.last_modified.0 > 1_600_000_000);
    assert_eq!(s.head("absent").unwrap(), None);
    // The same with everything in the URL.
    let explicit = store(&format!(
        "s3://plain-env?endpoint={}&region=garage&path_style=true",
        g.endpoint
    ));
    assert_eq!(explicit.head("hello.txt").unwrap().unwrap().size, 5);
}

#[test]
fn prefixes_list_as_directories_and_markers_merge_with_them() {
    let g = server();
    g.bucket("listing");
    let s = store("s3://listing/root");
    let m = PosixMeta::default();
    for k in ["a.txt", "dir/b.txt", "dir/sub/c.txt", "marked/", "zz"] {
        s.put(k, k.as_bytes().to_vec(), &m).unwrap();
    }
    // Outside the store's prefix: never listed.
    store("s3://listing")
        .put("elsewhere.txt", b"x".to_vec(), &m)
        .unwrap();
    let names: Vec<String> = s
        .list_dir("")
        .unwrap()
        .into_iter()
        .map(|l| match l {
            Listed::Object(o) => format!("f:{}:{}", o.rel, o.size),
            Listed::Dir(d) => format!("d:{d}"),
        })
        .collect();
    assert_eq!(names, ["f:a.txt:5", "d:dir", "d:marked", "f:zz:2"]);
    let sub: Vec<String> = s
        .list_dir("dir/")
        .unwrap()
        .into_iter()
        .map(|l| match l {
            Listed::Object(o) => o.rel,
            Listed::Dir(d) => format!("{d}/"),
        })
        .collect();
    assert_eq!(sub, ["dir/b.txt", "dir/sub/"]);
    assert!(s.list_dir("marked/").unwrap().is_empty());
}

#[test]
fn listing_pages_through_more_than_a_thousand_objects() {
    let g = server();
    g.bucket("paging");
    let s = store("s3://paging");
    let m = PosixMeta::default();
    for i in 0..1100 {
        s.put(&format!("d/f{i:05}"), vec![1], &m).unwrap();
    }
    let before = s.counters.lists.load(Ordering::Relaxed);
    let l = s.list_dir("d/").unwrap();
    assert_eq!(l.len(), 1100);
    assert!(
        s.counters.lists.load(Ordering::Relaxed) - before >= 2,
        "one page only?"
    );
}

#[test]
fn posix_metadata_written_by_rclone_and_by_ferryfs_reads_back() {
    let g = server();
    g.bucket("meta");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.txt");
    std::fs::write(&f, b"from rclone").unwrap();
    let ts = common::fixed_times();
    rustix::fs::utimensat(rustix::fs::CWD, &f, &ts, rustix::fs::AtFlags::empty()).unwrap();
    let out = common::run(
        g.rclone()
            .args(["copyto", f.to_str().unwrap(), "g:meta/r.txt"]),
    );
    assert!(
        out.status.success(),
        "rclone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = store("s3://meta");
    let info = s.head("r.txt").unwrap().unwrap();
    assert_eq!(info.size, 11);
    let meta = info.meta.unwrap();
    assert_eq!(meta.mtime, Some((1_100_000_000, 987_654_321)), "{meta:?}");
    // ferryfs writes the s3fs names, which rclone reads back as the modification time.
    let mine = PosixMeta {
        mode: Some(0o100640),
        uid: Some(1234),
        gid: Some(99),
        mtime: Some((1_400_000_000, 5)),
    };
    s.put("mine.txt", b"mine".to_vec(), &mine).unwrap();
    assert_eq!(s.head("mine.txt").unwrap().unwrap().meta, Some(mine));
    let out = common::run(g.rclone().args(["lsjson", "g:meta/mine.txt"]));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("\"ModTime\":\"2014-05-13T16:53:20.000000005Z\""),
        "rclone sees another time: {listing} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sequential_reads_are_fetched_ahead_in_chunks_and_random_ones_by_range() {
    let g = server();
    g.bucket("reads");
    let s = store("s3://reads");
    let data = pattern(5 << 20);
    let info = s.put("big", data.clone(), &PosixMeta::default()).unwrap();
    let info = s.head(&info.rel).unwrap().unwrap();
    let chunk = 1 << 20;
    let r = ObjectReader::new(s.clone(), info, chunk);
    let gets0 = s.counters.gets.load(Ordering::Relaxed);
    // 128 KiB sequential reads, as the kernel's readahead sends them.
    let mut got = Vec::new();
    let mut off = 0u64;
    loop {
        let d = r.read_at(off, 128 << 10).unwrap();
        if d.is_empty() {
            break;
        }
        off += d.len() as u64;
        got.extend_from_slice(&d);
    }
    assert!(got == data, "sequential read differs");
    let gets = s.counters.gets.load(Ordering::Relaxed) - gets0;
    assert_eq!(gets, 5, "one GET per 1 MiB chunk, not per read");
    // Random 4 KiB reads: one small GET each, the bytes exact.
    let before = s.counters.get_bytes.load(Ordering::Relaxed);
    for off in [4_000_000u64, 17, 3_333_333, (5 << 20) - 10] {
        let d = r.read_at(off, 4096).unwrap();
        let end = (off as usize + 4096).min(data.len());
        assert!(d == data[off as usize..end], "random read at {off}");
    }
    let fetched = s.counters.get_bytes.load(Ordering::Relaxed) - before;
    assert!(
        fetched <= 4 * 4096 + 2 * chunk,
        "random reads fetched {fetched} bytes"
    );
    assert!(r.read_at(5 << 20, 10).unwrap().is_empty());
}

#[test]
fn an_object_replaced_while_open_fails_with_estale_not_mixed_bytes() {
    let g = server();
    g.bucket("replaced");
    let s = store("s3://replaced");
    s.put("f", pattern(3 << 20), &PosixMeta::default()).unwrap();
    let info = s.head("f").unwrap().unwrap();
    let r = ObjectReader::new(s.clone(), info, 1 << 20);
    assert_eq!(r.read_at(0, 1000).unwrap().len(), 1000);
    s.put("f", vec![7u8; 3 << 20], &PosixMeta::default())
        .unwrap();
    let e = r.read_at(2 << 20, 1000).unwrap_err();
    assert_eq!(e.errno, libc::ESTALE, "{e}");
}

#[test]
fn bad_credentials_fail_with_eacces_and_never_show_the_secret() {
    let g = server();
    g.bucket("denied");
    // A profile that does not exist: no request is made, EACCES naming the credentials.
    let s = store("s3://denied?profile=nobody");
    let e = s.head("x").unwrap_err();
    assert_eq!(e.errno, libc::EACCES, "{e}");
    assert!(!e.to_string().contains(&g.secret));
    // A profile's keys win over the environment's (OLD and NEW may differ): the right key id
    // with a wrong secret is refused by the server.
    let s = store("s3://denied?profile=wrong");
    let e = s.head("x").unwrap_err();
    assert_eq!(e.errno, libc::EACCES, "{e}");
    assert!(!e.to_string().contains(&"0".repeat(64)));
    assert!(!e.to_string().contains(&g.secret));
}

/// An error names the endpoint its request went to, also when the endpoint came from the
/// environment and not from the store's URL (two stores may be on two services).
#[test]
fn errors_name_the_endpoint_the_request_went_to() {
    let g = server();
    g.bucket("where");
    let s = store("s3://where?profile=wrong");
    let e = s.head("x").unwrap_err();
    assert!(e.to_string().contains(&format!("at {}", g.endpoint)), "{e}");
    let e = s
        .put("y", b"y".to_vec(), &PosixMeta::default())
        .unwrap_err();
    assert!(e.to_string().contains(&format!("at {}", g.endpoint)), "{e}");
}

/// A server-side copy in parts (UploadPartCopy, what objects over 5 GiB take), here with
/// 5 MiB parts: the bytes and the new metadata arrive, the old version is refused.
#[test]
fn an_object_is_copied_by_the_server_in_parts() {
    let g = server();
    g.bucket("s3-copy-parts");
    let s = store("s3://s3-copy-parts");
    let data: Vec<u8> = (0..(12 << 20) + 4321)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let put = s.put("src", data.clone(), &PosixMeta::default()).unwrap();
    let meta = PosixMeta {
        mode: Some(0o100600),
        uid: Some(7),
        gid: Some(8),
        mtime: Some((1_600_000_000, 5)),
    };
    let size = data.len() as u64;
    s.copy_parts(&s, "src", &put.etag, size, "dst", &meta, 5 << 20)
        .unwrap();
    let got = s.head("dst").unwrap().unwrap();
    assert_eq!(got.size, size);
    assert_eq!(got.meta, Some(meta));
    assert!(got.etag.ends_with("-3\""), "three parts: {}", got.etag);
    let r = ObjectReader::new(s.clone(), got, 16 << 20);
    assert!(r.read_at(0, data.len()).unwrap() == data);
    // A version that is no longer there: refused, and nothing is left at the target.
    let e = s
        .copy_parts(&s, "src", "\"0123\"", size, "dst2", &meta, 5 << 20)
        .unwrap_err();
    assert_eq!(e.errno, libc::ESTALE, "{e}");
    assert!(s.head("dst2").unwrap().is_none());
}

/// A large object fetched in parallel ranged GETs (what the copier does from 64 MiB on), here
/// with 1 MiB ranges: every byte lands at its offset; `tick` sees every byte and can stop it;
/// a version that is no longer the object's fails ESTALE.
#[test]
fn a_large_object_is_fetched_in_parallel_ranges() {
    use std::io::Read;
    let g = server();
    g.bucket("s3-ranges");
    let s = store("s3://s3-ranges");
    let data: Vec<u8> = (0..(7 << 20) + 777).map(|i| (i * 13 % 251) as u8).collect();
    let put = s.put("big", data.clone(), &PosixMeta::default()).unwrap();
    let size = data.len() as u64;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = dir.join("copy");
    let out = std::fs::File::create(&path).unwrap();
    let gets = s.counters.gets.load(Ordering::Relaxed);
    let mut ticked = 0u64;
    let got = s
        .get_parallel_to_file("big", &put.etag, size, 1 << 20, &out, &mut |n| {
            ticked += n;
            true
        })
        .unwrap();
    assert_eq!(got, Some(()));
    assert_eq!(ticked, size);
    assert_eq!(
        s.counters.gets.load(Ordering::Relaxed) - gets,
        8,
        "8 ranges"
    );
    let mut back = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "the copy differs");
    // Stopped by tick: no error, `None`.
    let out2 = std::fs::File::create(dir.join("stopped")).unwrap();
    let got = s
        .get_parallel_to_file("big", &put.etag, size, 1 << 20, &out2, &mut |_| false)
        .unwrap();
    assert_eq!(got, None);
    // Replaced since it was listed: refused, not mixed.
    s.put("big", vec![9u8; data.len()], &PosixMeta::default())
        .unwrap();
    let out3 = std::fs::File::create(dir.join("stale")).unwrap();
    let e = s
        .get_parallel_to_file("big", &put.etag, size, 1 << 20, &out3, &mut |_| true)
        .unwrap_err();
    assert_eq!(e.errno, libc::ESTALE, "{e}");
}

/// A store on a service that is not AWS's, with no region anywhere: the region is never asked
/// of the EC2 instance metadata service (the SDK's default chain asks it last: a request off
/// the host). The metadata service is pointed at a listener here, which must see no
/// connection while `prepare` works (and fails: the store's port is closed).
#[test]
fn a_store_on_another_service_never_asks_the_instance_metadata_service_for_a_region() {
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    imds.set_nonblocking(true).unwrap();
    let closed = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("new")).unwrap();
    let out = common::run(
        std::process::Command::new(common::BIN)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "y")
            .env(
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{}", imds.local_addr().unwrap()),
            )
            .arg("prepare")
            .arg("--old")
            .arg(format!("s3://bkt?endpoint=http://127.0.0.1:{closed}"))
            .arg("--new")
            .arg(dir.path().join("new"))
            .arg("--state")
            .arg(dir.path().join("state")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "prepare of a closed port succeeded");
    assert!(err.contains(&format!("127.0.0.1:{closed}")), "{err}");
    match imds.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the instance metadata service was asked: {other:?}\n{err}"),
    }
}
