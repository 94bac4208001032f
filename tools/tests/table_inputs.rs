//! `stdctl` on table paths that are not plain files: links to devices and FIFOs are refused at once (never read, never waited on), `table seal` writes through a symbolic link, and out-of-domain profile parameters are refused by verify and seal alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "000102030405060708090a0b0c0d0e0f";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(what: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("stdctl-inputs-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    Dir(d)
}

/// Runs stdctl, killing it after 20 s: a hang is a failure, not a stuck test.
fn stdctl(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run stdctl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stdctl {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[cfg(unix)]
#[test]
fn links_to_devices_and_fifos_are_refused_without_blocking() {
    let d = scratch("kinds");
    let zero = d.0.join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let fifo = d.0.join("fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    for (path, kind) in [(&zero, "character device"), (&fifo, "FIFO")] {
        for cmd in ["verify", "show", "seal"] {
            let o = stdctl(&["table", cmd, s(path)]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd} {kind}: {err}");
            assert!(
                err.contains(&format!("not a regular file ({kind})")),
                "{cmd}: {err}"
            );
        }
    }
    assert!(std::fs::symlink_metadata(&zero)
        .expect("link")
        .file_type()
        .is_symlink());
}

#[cfg(unix)]
#[test]
fn seal_writes_through_a_symbolic_link() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("seal");
    std::fs::create_dir_all(d.0.join("tables")).expect("dir");
    let real = d.0.join("tables").join("v1.toml");
    let o = stdctl(&["table", "new", "--tms", "4", "--key", KEY, "-o", s(&real)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let link = d.0.join("current.toml");
    std::os::unix::fs::symlink("tables/v1.toml", &link).expect("symlink");
    // A deliberate edit through the link, then seal.
    let text = std::fs::read_to_string(&link).expect("read");
    std::fs::write(&link, text.replacen("version = 1\n", "version = 5\n", 1)).expect("edit");
    let o = stdctl(&["table", "seal", s(&link)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = std::fs::symlink_metadata(&link).expect("link");
    assert!(
        meta.file_type().is_symlink(),
        "seal replaced the link with a file"
    );
    let o = stdctl(&["table", "verify", s(&real)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("version 5"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::metadata(&real).expect("real").permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn seal_never_writes_what_verify_refuses() {
    let d = scratch("nan");
    let t = d.0.join("t.toml");
    let o = stdctl(&[
        "table",
        "new",
        "--tms",
        "4",
        "--key",
        KEY,
        "--profile",
        "gaussian",
        "--sigma",
        "2",
        "-o",
        s(&t),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&t).expect("read");
    assert!(text.contains("sigma = 2.0"), "{text}");
    for bad in ["sigma = nan", "sigma = -2.0", "sigma = inf"] {
        std::fs::write(&t, text.replacen("sigma = 2.0", bad, 1)).expect("edit");
        for cmd in ["seal", "verify"] {
            let o = stdctl(&["table", cmd, s(&t)]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{cmd} with {bad}: {err}");
            assert!(
                err.contains("profile parameter sigma"),
                "{cmd} with {bad}: {err}"
            );
        }
    }
}

#[test]
fn a_version_beyond_toml_integers_is_refused_not_written() {
    let d = scratch("version");
    let t = d.0.join("t.toml");
    let o = stdctl(&[
        "table",
        "new",
        "--tms",
        "2",
        "--key",
        KEY,
        "--table-version",
        "9223372036854775808",
        "-o",
        s(&t),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("out of range"), "{err}");
    assert!(!t.exists(), "a file that cannot be read back was written");
    // The largest version is written and read back.
    let o = stdctl(&[
        "table",
        "new",
        "--tms",
        "2",
        "--key",
        KEY,
        "--table-version",
        "9223372036854775807",
        "-o",
        s(&t),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = stdctl(&["table", "verify", s(&t)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("version 9223372036854775807"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
