//! The example configurations the stdd package ships (packaging/examples: front, back, combined) through `stdd check-config`, their paths pointed at a real table and real certificates: each is sound but for what only the host it is written for has (its interfaces, its CPUs) — and a world-readable TLS key is named.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::pki::Ca;

/// The example `name` with /etc/std/tls and /var/lib/stdd under `dir`.
fn example(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../packaging/examples/{name}")),
    )
    .expect("example");
    let text = text
        .replace("/etc/std/tls/", &format!("{}/", dir.display()))
        .replace("/var/lib/stdd/", &format!("{}/", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn problems(config: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_stdd"))
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("stdd check-config");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("stdd: ") && !l.contains(" problem"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_shipped_examples_are_sound_but_for_the_host_they_are_written_for() {
    let scratch = testkit::Scratch::new("stdd-examples");
    let dir = scratch.path();
    let ca = Ca::new(dir, "cluster");
    std::fs::copy(&ca.pem, dir.join("ca.pem")).expect("ca");
    ca.server(dir, "stdd", &["10.99.0.2"]);
    ca.client(dir, "stdd-client");
    let table = dir.join("table.toml");
    allocation::file::save(&table, &testkit::uniform(2)).expect("table");
    std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    for name in ["front.toml", "back.toml", "combined.toml"] {
        let config = example(dir, name);
        let left: Vec<String> = problems(&config)
            .into_iter()
            .filter(|p| !p.contains("no interface eth") && !p.contains("workers.cpus"))
            .collect();
        assert!(left.is_empty(), "{name}: {left:?}");
    }
    // The TLS key readable by every user: named, by its setting.
    std::fs::set_permissions(
        dir.join("stdd-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let said = problems(&example(dir, "front.toml"));
    assert!(
        said.iter()
            .any(|p| p.contains("admin.tls.key") && p.contains("readable by every user")),
        "{said:?}"
    );
}
