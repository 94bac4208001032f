//! The table file: TOML, format 1, checksummed; parsing validates everything and never panics.
//!
//! Layout (see `docs/table-format.md`): top-level `format`, `version`, `key`
//! and `checksum`; one `[[tm]]` per traffic manager (its position in the list
//! is its index); one `[[group]]` per TM group, the first being the default,
//! with `entries` as 64 rows of 64 TM ids (bucket = row × 64 + column).
//!
//! The checksum is FNV-1a 64 over the canonical rendering of the parsed
//! table (the file as [`render`] writes it, without the checksum line), so
//! re-indenting or adding comments keeps a file valid while any change of
//! meaning — one entry, one MAC, the version — is caught.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hasher;
use std::path::Path;

use fnv::FnvHasher;
use serde::Deserialize;

use crate::error::{FileError, TableError};
use crate::hash::HashKey;
use crate::mac::MacAddr;
use crate::profile::Profile;
use crate::rules::Rule;
use crate::table::{AllocationTable, Buckets, Group, HashMode, Tm, TmIndex};
use crate::TABLE_SIZE;

/// The file format this build reads and writes.
pub const FORMAT: u32 = 1;

/// Table files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

const ROW: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[allow(dead_code)] // checked before the typed parse
    format: i64,
    version: u64,
    key: String,
    checksum: String,
    #[serde(default)]
    tm: Vec<RawTm>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTm {
    id: u32,
    name: String,
    mac: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default = "default_group")]
    group: String,
}

fn one() -> u32 {
    1
}

fn default_group() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default = "endpoint")]
    hash: String,
    #[serde(default)]
    v4_prefix: Option<u8>,
    #[serde(default)]
    v6_prefix: Option<u8>,
    profile: Profile,
    equal_ports_tm: u32,
    entries: Vec<String>,
}

fn endpoint() -> String {
    "endpoint".into()
}

/// Whether a parsed file's checksum matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// It matched.
    Valid,
    /// It did not: the stored and the computed value.
    Mismatch {
        /// In the file.
        stored: String,
        /// Of the content.
        computed: String,
    },
}

fn field(location: impl Into<String>, message: impl Into<String>) -> FileError {
    FileError::Field {
        location: location.into(),
        message: message.into(),
    }
}

/// Parses and validates a table file, including its checksum.
pub fn parse(text: &str) -> Result<AllocationTable, FileError> {
    match parse_unverified(text)? {
        (table, Checksum::Valid) => Ok(table),
        (_, Checksum::Mismatch { stored, computed }) => {
            Err(FileError::Checksum { stored, computed })
        }
    }
}

/// Parses and validates a table file, reporting the checksum's state instead
/// of failing on it (for `stdctl table seal`, after a deliberate edit).
pub fn parse_unverified(text: &str) -> Result<(AllocationTable, Checksum), FileError> {
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| FileError::Syntax(one_line(&e.to_string())))?;
    match doc.get("format") {
        None => return Err(field("format", "missing (expected format = 1)")),
        Some(toml::Value::Integer(f)) if *f == i64::from(FORMAT) => {}
        Some(toml::Value::Integer(f)) => {
            return Err(FileError::UnsupportedFormat {
                found: *f,
                supported: FORMAT,
            })
        }
        Some(other) => {
            return Err(field(
                "format",
                format!("expected an integer, found {}", other.type_str()),
            ))
        }
    }
    let raw: RawFile = doc
        .try_into()
        .map_err(|e: toml::de::Error| FileError::Syntax(one_line(&e.to_string())))?;
    let key: HashKey = raw.key.parse().map_err(|e| field("key", format!("{e}")))?;

    let mut group_index: HashMap<&str, usize> = HashMap::new();
    for (g, rg) in raw.group.iter().enumerate() {
        if group_index.insert(rg.name.as_str(), g).is_some() {
            return Err(field(
                format!("group[{g}].name"),
                format!("group '{}' is defined twice", rg.name),
            ));
        }
    }
    let mut tms = Vec::with_capacity(raw.tm.len());
    let mut by_id: HashMap<u32, TmIndex> = HashMap::new();
    for (i, rt) in raw.tm.iter().enumerate() {
        let mac: MacAddr = rt
            .mac
            .parse()
            .map_err(|e| field(format!("tm[{i}].mac"), format!("{e}")))?;
        let group = *group_index.get(rt.group.as_str()).ok_or_else(|| {
            field(
                format!("tm[{i}].group"),
                format!("no [[group]] is named '{}'", rt.group),
            )
        })?;
        if i >= crate::table::MAX_TMS {
            return Err(TableError::TmCount {
                found: raw.tm.len(),
                max: crate::table::MAX_TMS,
            }
            .into());
        }
        if by_id.insert(rt.id, i as TmIndex).is_some() {
            return Err(field(
                format!("tm[{i}].id"),
                format!("id {} is used twice", rt.id),
            ));
        }
        tms.push(Tm {
            id: rt.id,
            name: rt.name.clone(),
            mac,
            weight: rt.weight,
            group,
        });
    }

    let mut groups = Vec::with_capacity(raw.group.len());
    for rg in raw.group {
        let at = |what: &str| format!("group '{}' {what}", rg.name);
        let hash = match (rg.hash.as_str(), rg.v4_prefix, rg.v6_prefix) {
            ("endpoint", None, None) => HashMode::Endpoint,
            ("endpoint", _, _) => {
                return Err(field(
                    at("v4_prefix/v6_prefix"),
                    "only valid with hash = \"address\"",
                ))
            }
            ("address", v4, v6) => HashMode::Address {
                v4_prefix: v4.unwrap_or(32),
                v6_prefix: v6.unwrap_or(128),
            },
            (other, _, _) => {
                return Err(field(
                    at("hash"),
                    format!("'{other}': expected \"endpoint\" or \"address\""),
                ))
            }
        };
        let equal_ports_tm = *by_id.get(&rg.equal_ports_tm).ok_or_else(|| {
            field(
                at("equal_ports_tm"),
                format!("TM id {} is not in the [[tm]] list", rg.equal_ports_tm),
            )
        })?;
        if rg.entries.len() != TABLE_SIZE / ROW {
            return Err(field(
                at("entries"),
                format!(
                    "{} rows; expected {} rows of {ROW} TM ids",
                    rg.entries.len(),
                    TABLE_SIZE / ROW
                ),
            ));
        }
        let mut owners = Vec::with_capacity(TABLE_SIZE);
        for (r, row) in rg.entries.iter().enumerate() {
            let mut cols = 0;
            for (c, tok) in row.split_whitespace().enumerate() {
                let loc = || {
                    at(&format!(
                        "entries row {r} column {c} (bucket {})",
                        r * ROW + c
                    ))
                };
                if c >= ROW {
                    return Err(field(loc(), format!("row {r} has more than {ROW} TM ids")));
                }
                let id: u32 = tok
                    .parse()
                    .map_err(|_| field(loc(), format!("'{tok}' is not a TM id")))?;
                let idx = *by_id
                    .get(&id)
                    .ok_or_else(|| field(loc(), format!("TM id {id} is not in the [[tm]] list")))?;
                owners.push(idx);
                cols = c + 1;
            }
            if cols != ROW {
                return Err(field(
                    at(&format!("entries row {r}")),
                    format!("{cols} TM ids; expected {ROW}"),
                ));
            }
        }
        groups.push(Group {
            buckets: Buckets::from_vec(owners, &rg.name)?,
            name: rg.name,
            rules: rg.rules,
            hash,
            profile: rg.profile,
            equal_ports_tm,
        });
    }
    let table = AllocationTable::from_parts(raw.version, key, tms, groups)?;
    let computed = checksum(&table);
    let status = if raw.checksum.trim() == computed {
        Checksum::Valid
    } else {
        Checksum::Mismatch {
            stored: raw.checksum,
            computed,
        }
    };
    Ok((table, status))
}

/// The checksum of a table: `fnv1a64:` and 16 hex digits.
pub fn checksum(table: &AllocationTable) -> String {
    let mut h = FnvHasher::default();
    h.write(render_body(table, None).as_bytes());
    format!("fnv1a64:{:016x}", h.finish())
}

/// The file text of a table, checksum included.
pub fn render(table: &AllocationTable) -> String {
    render_body(table, Some(&checksum(table)))
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn render_profile(p: &Profile) -> String {
    let num = |x: f64| format!("{x:?}");
    match p {
        Profile::Uniform => "{ kind = \"uniform\" }".into(),
        Profile::Weighted => "{ kind = \"weighted\" }".into(),
        Profile::Gaussian { mean, sigma } => {
            let mut s = String::from("{ kind = \"gaussian\"");
            if let Some(m) = mean {
                let _ = write!(s, ", mean = {}", num(*m));
            }
            if let Some(v) = sigma {
                let _ = write!(s, ", sigma = {}", num(*v));
            }
            s + " }"
        }
        Profile::Rayleigh { sigma } => match sigma {
            Some(v) => format!("{{ kind = \"rayleigh\", sigma = {} }}", num(*v)),
            None => "{ kind = \"rayleigh\" }".into(),
        },
        Profile::Custom { weights } => format!(
            "{{ kind = \"custom\", weights = [{}] }}",
            weights
                .iter()
                .map(|&w| num(w))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn render_rule(r: &Rule) -> String {
    let mut parts = Vec::new();
    if let Some(p) = r.protocol {
        parts.push(format!("protocol = {}", quote(&String::from(p))));
    }
    if let Some(ports) = r.ports {
        parts.push(format!("ports = {}", quote(&ports.to_string())));
    }
    if let Some(prefix) = r.prefix {
        parts.push(format!("prefix = {}", quote(&prefix.to_string())));
    }
    format!("{{ {} }}", parts.join(", "))
}

fn render_body(t: &AllocationTable, checksum: Option<&str>) -> String {
    let mut s = String::with_capacity(32 * 1024);
    if checksum.is_some() {
        s.push_str(
            "# Allocation table of a statistical traffic distributor cluster (format 1, docs/table-format.md).\n\
             # The checksum covers the content: after a deliberate edit, run `stdctl table seal FILE`.\n",
        );
    }
    let _ = writeln!(s, "format = {FORMAT}");
    let _ = writeln!(s, "version = {}", t.version());
    let _ = writeln!(s, "key = {}", quote(&t.key().to_hex()));
    if let Some(c) = checksum {
        let _ = writeln!(s, "checksum = {}", quote(c));
    }
    for tm in t.tms() {
        let _ = write!(
            s,
            "\n[[tm]]\nid = {}\nname = {}\nmac = {}\nweight = {}\ngroup = {}\n",
            tm.id,
            quote(&tm.name),
            quote(&tm.mac.to_string()),
            tm.weight,
            quote(&t.groups()[tm.group].name)
        );
    }
    for g in t.groups() {
        let _ = write!(s, "\n[[group]]\nname = {}\n", quote(&g.name));
        match g.hash {
            HashMode::Endpoint => s.push_str("hash = \"endpoint\"\n"),
            HashMode::Address {
                v4_prefix,
                v6_prefix,
            } => {
                let _ = write!(
                    s,
                    "hash = \"address\"\nv4_prefix = {v4_prefix}\nv6_prefix = {v6_prefix}\n"
                );
            }
        }
        let _ = writeln!(s, "profile = {}", render_profile(&g.profile));
        let ep = t.tm(g.equal_ports_tm).map_or(0, |tm| tm.id);
        let _ = writeln!(s, "equal_ports_tm = {ep}");
        if g.rules.is_empty() {
            s.push_str("rules = []\n");
        } else {
            s.push_str("rules = [\n");
            for r in &g.rules {
                let _ = writeln!(s, "  {},", render_rule(r));
            }
            s.push_str("]\n");
        }
        s.push_str("entries = [\n");
        for row in g.buckets.as_slice().chunks(ROW) {
            let ids: Vec<String> = row
                .iter()
                .map(|&o| t.tm(o).map_or(0, |tm| tm.id).to_string())
                .collect();
            let _ = writeln!(s, "  \"{}\",", ids.join(" "));
        }
        s.push_str("]\n");
    }
    s
}

/// Reads, parses and validates a table file (checksum included).
pub fn load(path: impl AsRef<Path>) -> Result<AllocationTable, FileError> {
    parse(&read(path.as_ref())?)
}

/// Reads a table file's text, refusing files over [`MAX_FILE_BYTES`].
pub fn read(path: &Path) -> Result<String, FileError> {
    let io = |error| FileError::Io {
        path: path.display().to_string(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(field(
            path.display().to_string(),
            format!(
                "{} bytes; a table file is at most {MAX_FILE_BYTES}",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    String::from_utf8(bytes)
        .map_err(|e| field(path.display().to_string(), format!("not UTF-8 text: {e}")))
}

/// Writes a table file atomically (a temporary file in the same directory,
/// then a rename), so a reader never sees half a table.
pub fn save(path: impl AsRef<Path>, table: &AllocationTable) -> Result<(), FileError> {
    let path = path.as_ref();
    let io = |error| FileError::Io {
        path: path.display().to_string(),
        error,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, render(table)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::profile::Profile;
    use crate::table::test::uniform;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let t = uniform(8);
        let t = t
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: Some(3.5),
                    sigma: Some(2.0),
                },
            )
            .expect("rebalance")
            .table;
        let text = render(&t);
        let back = parse(&text).expect("parse");
        assert_eq!(back, t);
        assert_eq!(render(&back), text);
    }

    #[test]
    fn whitespace_and_comments_do_not_break_the_checksum() {
        let text = render(&uniform(4));
        let edited = text
            .replace("\n[[tm]]", "\n# a comment\n\n[[tm]]")
            .replace("weight = 1", "weight   =   1");
        assert!(parse(&edited).is_ok());
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn corruptions_are_named() {
        let text = render(&uniform(4));
        // One entry changed: the checksum catches it.
        let i = text.find("entries = [\n  \"").expect("entries") + 15;
        let mut bad = text.clone();
        bad.replace_range(i..i + 1, if &text[i..i + 1] == "0" { "1" } else { "0" });
        assert!(err(&bad).contains("checksum mismatch"), "{}", err(&bad));
        // An unknown TM id: named with its bucket.
        let bad = text.replacen("entries = [\n  \"0 ", "entries = [\n  \"9 ", 1);
        assert!(
            err(&bad).contains("row 0 column 0 (bucket 0): TM id 9 is not in the [[tm]] list"),
            "{}",
            err(&bad)
        );
        // A short row.
        let bad = text.replacen("entries = [\n  \"0 ", "entries = [\n  \"", 1);
        assert!(
            err(&bad).contains("entries row 0: 63 TM ids"),
            "{}",
            err(&bad)
        );
        // A bad MAC.
        let bad = text.replacen("mac = \"02:53:54:00:00:01\"", "mac = \"zz\"", 1);
        assert!(err(&bad).contains("tm[0].mac"), "{}", err(&bad));
        // Unsupported format, missing format, syntax, unknown fields.
        assert!(err(&text.replacen("format = 1", "format = 2", 1))
            .contains("format 2 is not supported"));
        assert!(err(&text.replacen("format = 1", "", 1)).contains("format: missing"));
        assert!(
            err(&text.replacen("version = 1", "version = [", 1)).contains("not a valid table file")
        );
        assert!(err(&text.replacen("weight = 1", "weight = 1\ncolour = 3", 1)).contains("colour"));
        assert!(
            err(&text.replacen("group = \"default\"", "group = \"nope\"", 1))
                .contains("tm[0].group")
        );
        assert!(err("").contains("format"));
    }

    #[test]
    fn seal_flow_reports_the_mismatch() {
        let text = render(&uniform(4)).replacen("version = 1", "version = 2", 1);
        let (t, c) = parse_unverified(&text).expect("parse");
        assert_eq!(t.version(), 2);
        assert!(matches!(c, Checksum::Mismatch { .. }));
        assert!(parse(&render(&t)).is_ok());
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("std-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.toml");
        let t = uniform(5);
        save(&path, &t).expect("save");
        assert_eq!(load(&path).expect("load"), t);
        assert!(matches!(
            load(dir.join("missing.toml")),
            Err(FileError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Mutated files (bytes flipped, cut, spliced) never panic the
        /// parser; anything it accepts is a valid table.
        #[test]
        fn mutated_files_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
            cut in any::<Option<prop::sample::Index>>(),
        ) {
            let mut bytes = render(&uniform(3)).into_bytes();
            for (at, byte, kind) in edits {
                let i = at.index(bytes.len());
                match kind {
                    0 => bytes[i] = byte,
                    1 => { bytes.remove(i); }
                    2 => bytes.insert(i, byte),
                    _ => { let n = bytes.len(); bytes.copy_within(i..n.min(i + 8), i / 2); }
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(t) = parse(&text) {
                prop_assert_eq!(t.groups()[0].buckets.as_slice().len(), TABLE_SIZE);
            }
        }
    }
}
