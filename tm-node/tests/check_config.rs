//! `tmd check-config` as a process: a sound configuration passes with a summary; a table without this TM, a readable key, ports that leave no self-source port and a table that does not parse are each one line naming the cause.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn write(dir: &Path, tm_id: u32, ports: &str) {
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {tm_id}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\nsnat_ports = \"{ports}\"\n\n\
             [[pool]]\nname = \"web\"\nservers = [{{ address = \"127.0.0.40:8080\" }}]\n\n\
             [[virtual_server]]\nname = \"web\"\nlisten = \"127.0.0.41:80\"\npool = \"web\"\n"
        ),
    )
    .expect("config");
}

fn check(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tmd"))
        .args(["check-config", "--config"])
        .arg(dir.join("tmd.toml"))
        .output()
        .expect("tmd check-config")
}

#[test]
fn check_config_passes_a_sound_configuration_and_names_each_problem() {
    let scratch = testkit::Scratch::new("tmd-check");
    let dir = scratch.path().to_path_buf();
    let key = dir.join("table.toml");
    allocation::file::save(&key, &testkit::uniform(4)).expect("table");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    write(&dir, 2, "1024-65535");
    let out = check(&dir);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with("ok: ") && said.contains("TM id 2") && said.contains("127.0.0.30: "),
        "{said}"
    );
    // Not in the table, and the key readable by every user: two lines.
    write(&dir, 9, "1024-65535");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.lines()
            .any(|l| l.starts_with("tmd: tm_id: TM id 9 is not in table version 1")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("readable by every user (mode 644)")),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");
    // A port range too narrow to hold a self-source port of this TM.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    write(&dir, 2, "40000-40000");
    let out = check(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t = testkit::uniform(4);
    let k = t.tm_index_by_id(2).expect("tm");
    let owns = allocation::SelfPorts::build(
        &t,
        "127.0.0.30".parse().expect("ip"),
        k,
        "40000-40000".parse().expect("range"),
    )
    .map(|s| s.iter().count())
    .unwrap_or(0);
    assert_eq!(out.status.success(), owns > 0, "{said}");
    // A TM the table gives no bucket (failed over, drained) rightly has no
    // self-source port: fit to run, and the summary says why it has none.
    let t = testkit::uniform(4);
    let out_of_service = t
        .failover(&[t.tm_index_by_id(2).expect("tm")])
        .expect("failover")
        .table;
    allocation::file::save(&key, &out_of_service).expect("table");
    write(&dir, 2, "1024-65535");
    let out = check(&dir);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("no bucket in this table"), "{said}");
    // A table that does not parse.
    std::fs::write(&key, "version = ").expect("write");
    let out = check(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .lines()
        .any(|l| l.starts_with("tmd: table ")));
}

/// The example the tmd package ships (packaging/examples/tmd.toml), its
/// paths pointed at a real table and real certificates: sound.
#[test]
fn the_shipped_example_passes_check_config() {
    let scratch = testkit::Scratch::new("tmd-example");
    let dir = scratch.path().to_path_buf();
    let ca = testkit::pki::Ca::new(&dir, "cluster");
    std::fs::copy(&ca.pem, dir.join("ca.pem")).expect("ca");
    ca.server(&dir, "tmd", &["10.99.0.10"]);
    let table = dir.join("table.toml");
    allocation::file::save(&table, &testkit::uniform(2)).expect("table");
    std::fs::set_permissions(&table, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples/tmd.toml"),
    )
    .expect("example")
    .replace("/etc/std/tls/", &format!("{}/", dir.display()))
    .replace("/var/lib/tmd/", &format!("{}/", dir.display()));
    std::fs::write(dir.join("tmd.toml"), text).expect("write");
    let out = check(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
