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
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

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
        .map_err(|e: toml::de::Error| syntax(text, &e))?;
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
    match doc.get("version") {
        Some(toml::Value::Integer(v)) if *v < 0 => {
            return Err(field(
                "version",
                format!("{v} is out of range: {VERSION_RANGE}"),
            ))
        }
        Some(toml::Value::Integer(_)) | None => {}
        Some(other) => {
            return Err(field(
                "version",
                format!(
                    "expected an integer, found {} ({VERSION_RANGE})",
                    other.type_str()
                ),
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

/// What `key` says in a table shown without its key.
pub const REDACTED_KEY: &str = "redacted";

/// The file text of a table as an admin endpoint shows it: with the hash
/// key only when `with_key` (asked for, with the token), else the key's
/// value is [`REDACTED_KEY`] — the text then does not load as a table (the
/// key is not hex), so nothing steers by a key it was not given.
pub fn render_for(table: &AllocationTable, with_key: bool) -> String {
    let text = render(table);
    if with_key {
        return text;
    }
    let key_line = format!("key = {}\n", quote(&table.key().to_hex()));
    text.replacen(
        &key_line,
        &format!(
            "# The hash key is not shown: GET with ?key=include (and the admin token).\nkey = {}\n",
            quote(REDACTED_KEY)
        ),
        1,
    )
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

/// Opens without blocking where `O_NONBLOCK` has the generic Linux value
/// (`libc` is not a dependency of this crate): opening a FIFO then returns
/// at once instead of waiting for a writer, and the open file is refused as
/// not regular. Elsewhere the type check before the open is the guard; it
/// leaves only the race of a path replaced in between.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
))]
fn nonblocking(options: &mut std::fs::OpenOptions) {
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    options.custom_flags(O_NONBLOCK);
}

#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
)))]
fn nonblocking(_: &mut std::fs::OpenOptions) {}

/// Refuses anything but a regular file, naming what it is.
fn regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), FileError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    let kind = if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        unix_kind(&t)
    };
    Err(FileError::NotRegular {
        path: path.display().to_string(),
        kind,
    })
}

#[cfg(unix)]
fn unix_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn unix_kind(_: &std::fs::FileType) -> &'static str {
    "special file"
}

/// Reads a table file's text: only a regular file (symbolic links
/// followed), at most [`MAX_FILE_BYTES`], UTF-8.
///
/// The type is checked on the path before opening, so a FIFO or a device
/// is never opened for reading (opening a FIFO waits for a writer), then
/// again on the open file, in case the path changed in between; the read
/// itself is bounded, whatever the file's metadata claims.
pub fn read(path: &Path) -> Result<String, FileError> {
    let io = |error| FileError::Io {
        path: path.display().to_string(),
        error,
    };
    let too_large = || FileError::TooLarge {
        path: path.display().to_string(),
        max: MAX_FILE_BYTES,
    };
    regular(path, &std::fs::metadata(path).map_err(io)?)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    nonblocking(&mut options);
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    regular(path, &meta)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes)
        .map_err(|e| field(path.display().to_string(), format!("not UTF-8 text: {e}")))
}

/// The file a path finally names: symbolic links followed (relative ones
/// against their own directory), the last one possibly dangling.
fn final_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    // As many links as Linux follows (ELOOP beyond).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// Writes a table file atomically (a temporary file in the same directory,
/// then a rename), so a reader never sees half a table.
///
/// A symbolic link is written through: the file it points to is replaced
/// (the temporary file goes next to that file) and the link stays. An
/// existing file keeps its permission bits (a table holds the cluster's
/// key: a file made private stays private).
pub fn save(path: impl AsRef<Path>, table: &AllocationTable) -> Result<(), FileError> {
    let path = path.as_ref();
    let io = |error| FileError::Io {
        path: path.display().to_string(),
        error,
    };
    let target = final_target(path).map_err(io)?;
    let permissions = match std::fs::metadata(&target) {
        Ok(m) => {
            regular(path, &m)?;
            Some(m.permissions())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = target.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        // A stale temporary file (same pid, an earlier crash) is replaced;
        // create_new never follows a link planted under its name.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if let Some(p) = &permissions {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            // Never wider than the final mode, even before the chmod below.
            options.mode(p.mode() & 0o777);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(render(table).as_bytes())?;
        if let Some(p) = &permissions {
            file.set_permissions(p.clone())?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &target)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

const VERSION_RANGE: &str =
    "a table version is at least 0 and at most 9223372036854775807 (TOML integers are signed 64-bit)";
const _: () = assert!(crate::table::MAX_VERSION == 9_223_372_036_854_775_807);

/// A TOML error as a [`FileError`]: an integer too large for TOML (i64) in
/// the `version` line is named as such; anything else is a syntax error.
fn syntax(text: &str, e: &toml::de::Error) -> FileError {
    let line = e.span().and_then(|span| {
        let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        text.get(start..)?.lines().next()
    });
    if let Some((key, value)) = line.and_then(|l| l.split_once('=')) {
        let value = value.split('#').next().unwrap_or("").trim();
        let digits = value.strip_prefix('+').unwrap_or(value).replace('_', "");
        if key.trim() == "version"
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
        {
            return field(
                "version",
                format!("{value} is out of range: {VERSION_RANGE}"),
            );
        }
    }
    FileError::Syntax(one_line(&e.to_string()))
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

    /// A fresh directory per call: tests run in parallel.
    fn scratch(what: &str) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("std-file-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// `load(path)` on another thread, given `secs` seconds: a hang is a failure.
    fn load_within(path: &Path, secs: u64) -> Result<AllocationTable, FileError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(load(&p));
        });
        rx.recv_timeout(std::time::Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("load({}) hung", path.display()))
    }

    #[cfg(unix)]
    #[test]
    fn devices_fifos_and_directories_are_refused_without_reading() {
        let dir = scratch("kinds");
        // A link to /dev/zero: its metadata says 0 bytes, reading never ends.
        let zero = dir.join("zero.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        match load_within(&zero, 20) {
            Err(FileError::NotRegular { kind, .. }) => assert_eq!(kind, "character device"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A FIFO nobody writes to: opening it for reading would block forever.
        let fifo = dir.join("fifo.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        match load_within(&fifo, 20) {
            Err(FileError::NotRegular { kind, .. }) => assert_eq!(kind, "FIFO"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A link to a FIFO, and a directory.
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&fifo, &link).expect("symlink");
        assert!(matches!(
            load_within(&link, 20),
            Err(FileError::NotRegular { kind: "FIFO", .. })
        ));
        let e = load_within(&dir, 20).map(|_| ()).expect_err("a directory");
        assert!(
            e.to_string().contains("not a regular file (directory)"),
            "{e}"
        );
        // A regular file over the limit (sparse: nothing is written).
        let big = dir.join("big.toml");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(MAX_FILE_BYTES + 1))
            .expect("big");
        assert!(matches!(
            load_within(&big, 20),
            Err(FileError::TooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[cfg(unix)]
    #[test]
    fn save_writes_through_a_symlink_and_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("link");
        std::fs::create_dir_all(dir.join("real")).expect("dir");
        let target = dir.join("real").join("t.toml");
        save(&target, &uniform(3)).expect("save");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // A relative link, as operators make them.
        let link = dir.join("current.toml");
        std::os::unix::fs::symlink("real/t.toml", &link).expect("symlink");
        let next = uniform(4).with_version(7);
        save(&link, &next).expect("save through the link");
        let meta = std::fs::symlink_metadata(&link).expect("link");
        assert!(meta.file_type().is_symlink(), "the link was replaced");
        assert_eq!(load(&target).expect("target"), next);
        assert_eq!(
            std::fs::metadata(&target)
                .expect("target")
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "the mode was not kept"
        );
        // No temporary file is left behind, in either directory.
        for d in [dir.clone(), dir.join("real")] {
            for e in std::fs::read_dir(&d).expect("list") {
                let name = e.expect("entry").file_name();
                assert!(
                    !name.to_string_lossy().contains(".tmp-"),
                    "{name:?} left in {}",
                    d.display()
                );
            }
        }
        // A plain file keeps its mode too.
        save(&target, &uniform(5)).expect("save");
        assert_eq!(
            std::fs::metadata(&target)
                .expect("target")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn bad_profile_parameters_are_refused_naming_the_parameter() {
        let gaussian = uniform(4)
            .rebalance(
                0,
                &Profile::Gaussian {
                    mean: Some(1.5),
                    sigma: Some(2.0),
                },
            )
            .expect("rebalance")
            .table;
        let g = render(&gaussian);
        assert!(g.contains("mean = 1.5, sigma = 2.0"), "{g}");
        let custom = uniform(4)
            .rebalance(
                0,
                &Profile::Custom {
                    weights: vec![1.0, 2.0, 3.0, 4.0],
                },
            )
            .expect("rebalance")
            .table;
        let c = render(&custom);
        assert!(c.contains("weights = [1.0, 2.0, 3.0, 4.0]"), "{c}");
        for (text, from, to, named) in [
            (&g, "sigma = 2.0", "sigma = nan", "sigma"),
            (&g, "sigma = 2.0", "sigma = -1.0", "sigma"),
            (&g, "sigma = 2.0", "sigma = 0.0", "sigma"),
            (&g, "sigma = 2.0", "sigma = inf", "sigma"),
            (&g, "mean = 1.5", "mean = inf", "mean"),
            (&g, "mean = 1.5", "mean = -nan", "mean"),
            (
                &c,
                "[1.0, 2.0, 3.0, 4.0]",
                "[1.0, 2.0, 3.0]",
                "3 weights for 4",
            ),
            (
                &c,
                "[1.0, 2.0, 3.0, 4.0]",
                "[1.0, 2.0, 3.0, 4.0, 5.0]",
                "5 weights for 4",
            ),
            (
                &c,
                "[1.0, 2.0, 3.0, 4.0]",
                "[1.0, -2.0, 3.0, 4.0]",
                "weights[1]",
            ),
            (
                &c,
                "[1.0, 2.0, 3.0, 4.0]",
                "[1.0, 2.0, nan, 4.0]",
                "weights[2]",
            ),
            (
                &c,
                "[1.0, 2.0, 3.0, 4.0]",
                "[1.0, 2.0, 3.0, inf]",
                "weights[3]",
            ),
        ] {
            let bad = text.replacen(from, to, 1);
            assert_ne!(&bad, text);
            // Refused even on the seal path, so seal never writes what verify rejects.
            match parse_unverified(&bad) {
                Ok((t, _)) => panic!("{to} accepted; it renders as {}", render(&t)),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains(named), "{to}: {e}");
                    assert!(e.contains("group 'default'"), "{to}: {e}");
                }
            }
        }
    }

    #[test]
    fn versions_outside_toml_integers_are_refused() {
        let text = render(&uniform(3));
        // The largest version round-trips.
        let top = render(&uniform(3).with_version(i64::MAX as u64));
        assert_eq!(parse(&top).expect("i64::MAX").version(), i64::MAX as u64);
        for v in [
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999999",
            "-1",
            "1.5",
            "\"2\"",
        ] {
            let bad = text.replacen("version = 1\n", &format!("version = {v}\n"), 1);
            let e = parse_unverified(&bad).map(|_| ()).expect_err(v).to_string();
            assert!(e.starts_with("version: "), "{v}: {e}");
            assert!(e.contains("at most 9223372036854775807"), "{v}: {e}");
        }
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
