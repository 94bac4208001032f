//! The documented environment overrides reach the real `stdd`: `STD_<KEY>`, nested keys joined with `__` (`STD_ADMIN__LISTEN`), and a misspelt key is an error that names it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use allocation::{AllocationTable, GroupSpec, HashKey, MacAddr, Profile, Tm};
use distributor::build::{self, tcp_flags, L2};
use distributor::pcap::Writer;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory with `table.toml`, a one-frame capture `c.pcap` and
/// `stdd.toml` naming the table `table`.
fn setup(what: &str, table: &str) -> Dir {
    let dir = Dir(std::env::temp_dir().join(format!("stdd-env-{what}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    let tms = (0..2)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1,
            group: 0,
        })
        .collect();
    let key: HashKey = "000102030405060708090a0b0c0d0e0f".parse().expect("key");
    let t = AllocationTable::new(
        1,
        key,
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table");
    allocation::file::save(dir.0.join("table.toml"), &t).expect("save");
    let group: MacAddr = "02:53:54:44:00:01".parse().expect("mac");
    let f = build::tcp_frame(
        &L2::new(group, MacAddr([2, 0xee, 0, 0, 0, 1])),
        "203.0.113.7".parse().expect("addr"),
        40000,
        "198.51.100.10".parse().expect("addr"),
        443,
        tcp_flags::SYN,
        b"",
    );
    let mut w = Writer::new(Vec::new()).expect("writer");
    w.write(1, f.len() as u32, &f).expect("write");
    std::fs::write(dir.0.join("c.pcap"), w.into_inner().expect("flush")).expect("capture");
    std::fs::write(
        dir.0.join("stdd.toml"),
        format!(
            "role = \"front\"\ngroup_mac = \"{group}\"\ncluster_addresses = [\"198.51.100.10\"]\ntable = \"{table}\"\nbackend = \"pcap-file\"\n\n\
             [[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"c.pcap\"\n\n\
             [[port]]\nname = \"tms\"\nkind = \"tm\"\noutput = \"tms.pcap\"\ntms = [0, 1]\n\n\
             [admin]\nlisten = \"127.0.0.1:9180\"\n"
        ),
    )
    .expect("config");
    dir
}

/// `stdd replay --config` (it loads the configuration and exits) with
/// `env` set and no other `STD_*` variable.
fn replay(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stdd"));
    c.arg("replay")
        .arg("--config")
        .arg(dir.join("stdd.toml"))
        .arg(dir.join("c.pcap"))
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--json");
    for (k, _) in std::env::vars() {
        if k.starts_with("STD_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().expect("run stdd")
}

#[test]
fn a_top_level_key_is_overridden_by_std_key() {
    let dir = setup("top", "missing.toml");
    let o = replay(&dir.0, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.toml"));
    let table = dir.0.join("table.toml");
    let o = replay(&dir.0, &[("STD_TABLE", table.to_str().expect("path"))]);
    assert!(
        o.status.success(),
        "STD_TABLE is ignored: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_nested_key_is_overridden_by_std_section_and_key() {
    let dir = setup("nested", "table.toml");
    assert!(replay(&dir.0, &[]).status.success());
    // A non-loopback admin address without a token: refused, so the override was read.
    let o = replay(&dir.0, &[("STD_ADMIN__LISTEN", "192.0.2.1:9180")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "STD_ADMIN__LISTEN is ignored: {err}"
    );
    assert!(err.contains("admin.token"), "{err}");
    assert!(err.contains("192.0.2.1:9180"), "{err}");
    // With a token: TLS is still wanted, or plain HTTP said out loud.
    let o = replay(
        &dir.0,
        &[
            ("STD_ADMIN__LISTEN", "192.0.2.1:9180"),
            ("STD_ADMIN__TOKEN", "s3cret"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("admin.tls: required"),
        "{err}"
    );
    let o = replay(
        &dir.0,
        &[
            ("STD_ADMIN__LISTEN", "192.0.2.1:9180"),
            ("STD_ADMIN__TOKEN", "s3cret"),
            ("STD_ADMIN__INSECURE_PLAINTEXT", "true"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_misspelt_override_is_an_error_naming_it() {
    let dir = setup("typo", "table.toml");
    // One underscore where two are needed: `admin_listen` is no key.
    let o = replay(&dir.0, &[("STD_ADMIN_LISTEN", "192.0.2.1:9180")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("admin_listen"), "{err}");
    assert!(err.contains("STD_ADMIN_LISTEN"), "{err}");
}
