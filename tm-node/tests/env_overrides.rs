//! The documented environment overrides reach the real `tmd`: `TMD_<KEY>`, nested keys joined with `__` (`TMD_ADMIN__LISTEN`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A valid configuration whose table file does not exist: `tmd run` reads
/// and validates the configuration, then stops at the table.
fn setup(what: &str) -> Dir {
    let dir = Dir(std::env::temp_dir().join(format!("tmd-env-{what}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    std::fs::write(
        dir.0.join("tmd.toml"),
        "tm_id = 1\ntable = \"no-such-table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\n\n\
         [[pool]]\nname = \"web\"\nmethod = \"round-robin\"\nservers = [{ address = \"127.0.0.1:9\" }]\n\n\
         [[virtual_server]]\nname = \"web\"\nlisten = \"127.0.0.1:9\"\npool = \"web\"\n\n\
         [admin]\nlisten = \"127.0.0.1:9190\"\n",
    )
    .expect("config");
    dir
}

fn tmd(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tmd"));
    c.arg("run").arg("--config").arg(dir.join("tmd.toml"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TMD_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().expect("run tmd")
}

#[test]
fn tmd_key_and_tmd_section_and_key_override_the_file() {
    let dir = setup("overrides");
    let o = tmd(&dir.0, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no-such-table.toml"), "{err}");
    // Nested: a non-loopback admin address needs a token.
    let o = tmd(&dir.0, &[("TMD_ADMIN__LISTEN", "192.0.2.1:9190")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("admin.token") && err.contains("192.0.2.1:9190"),
        "TMD_ADMIN__LISTEN is ignored: {err}"
    );
    // Top level (as scripts/bench-tmd sets TMD_WORKERS).
    let o = tmd(&dir.0, &[("TMD_WORKERS", "0")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("workers: must be 1 to 1024"),
        "TMD_WORKERS is ignored: {err}"
    );
    // A table path from the environment.
    let o = tmd(&dir.0, &[("TMD_TABLE", "/nonexistent/other.toml")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/other.toml"),
        "TMD_TABLE is ignored: {err}"
    );
}
