//! Typed errors of the allocation crate, one enum per concern.

use std::net::IpAddr;

use thiserror::Error;

/// A value that could not be parsed from text (CLI arguments, file fields).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what} '{input}': {reason}")]
pub struct ParseError {
    /// What was being parsed ("MAC address", "port range", …).
    pub what: &'static str,
    /// The offending input.
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ParseError {
    /// Builds a parse error.
    pub fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        ParseError {
            what,
            input: input.chars().take(80).collect(),
            reason: reason.into(),
        }
    }
}

/// A profile that cannot produce target counts.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ProfileError {
    /// The group has no traffic managers.
    #[error("the group has no traffic managers")]
    NoTms,
    /// Every TM got weight zero: nobody would receive an entry.
    #[error("the profile gives no traffic manager any entry")]
    NoEntries,
    /// A parameter is out of its domain.
    #[error("profile parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name (`sigma`, `mean`, `weights[3]`).
        name: String,
        /// The rejected value.
        value: f64,
        /// The domain it violates.
        reason: &'static str,
    },
    /// A custom profile lists a different number of weights than TMs.
    #[error("custom profile lists {given} weights for {tms} traffic managers")]
    CustomLength {
        /// Weights given.
        given: usize,
        /// TMs in the group.
        tms: usize,
    },
    /// An unknown profile name.
    #[error("unknown profile '{0}' (expected uniform, weighted, gaussian, rayleigh or custom)")]
    Unknown(String),
}

/// A table that breaks an invariant, or an operation that cannot apply.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TableError {
    /// The entry list does not have exactly 4096 entries.
    #[error("group '{group}' has {size} entries, expected {expected}")]
    InvalidTableSize {
        /// Group name.
        group: String,
        /// Entries found.
        size: usize,
        /// Entries required (4096).
        expected: usize,
    },
    /// An entry names a TM index outside the TM list.
    #[error("group '{group}' bucket {bucket} names TM index {tm}, but only {count} TMs exist")]
    UnknownTm {
        /// Group name.
        group: String,
        /// Bucket number.
        bucket: usize,
        /// The TM index found.
        tm: usize,
        /// TMs in the list.
        count: usize,
    },
    /// An entry names a TM of another group.
    #[error(
        "group '{group}' bucket {bucket} names TM '{tm}', which belongs to group '{tm_group}'"
    )]
    ForeignTm {
        /// Group name.
        group: String,
        /// Bucket number.
        bucket: usize,
        /// TM name.
        tm: String,
        /// The group the TM belongs to.
        tm_group: String,
    },
    /// Two TMs share an id, a name or a MAC address.
    #[error("traffic managers {first} and {second} share the {field} '{value}'")]
    DuplicateTm {
        /// The duplicated field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Index of the first TM.
        first: usize,
        /// Index of the second TM.
        second: usize,
    },
    /// No traffic manager at all, or more than the table can address.
    #[error("a table needs 1 to {max} traffic managers, found {found}")]
    TmCount {
        /// TMs found.
        found: usize,
        /// Maximum.
        max: usize,
    },
    /// A TM names a group that does not exist.
    #[error("traffic manager '{tm}' names unknown group '{group}'")]
    UnknownGroup {
        /// TM name.
        tm: String,
        /// Group named.
        group: String,
    },
    /// Group list problems (none, duplicate names, rules on the default group …).
    #[error("groups: {0}")]
    Groups(String),
    /// A group's equal-port TM is not a member of the group.
    #[error("group '{group}': equal-ports TM index {tm} is not a member of the group")]
    EqualPortsTm {
        /// Group name.
        group: String,
        /// The TM index given.
        tm: usize,
    },
    /// A TM index passed to an operation does not exist.
    #[error("no traffic manager with index {0}")]
    NoSuchTm(usize),
    /// A failover would leave a group with no surviving TM.
    #[error("group '{group}' would have no surviving traffic manager")]
    NoSurvivors {
        /// Group name.
        group: String,
    },
    /// The profile could not produce targets.
    #[error("group '{group}': {source}")]
    Profile {
        /// Group name.
        group: String,
        /// The profile's error.
        #[source]
        source: ProfileError,
    },
    /// Target counts do not fit the table (wrong length or sum).
    #[error("targets sum to {sum} over {len} TMs; expected 4096 over {tms}")]
    Targets {
        /// Sum of targets.
        sum: u64,
        /// Length of the target list.
        len: usize,
        /// TMs in the table.
        tms: usize,
    },
    /// A table version beyond what the table file can hold (TOML integers
    /// are signed 64-bit): creating or bumping to it is refused.
    #[error("table version {version} is out of range (the largest is {max})")]
    VersionRange {
        /// The version asked for (for a bump: the version it starts from, plus one, saturated).
        version: u64,
        /// The largest version a table may have ([`crate::table::MAX_VERSION`]).
        max: u64,
    },
    /// A swap offered a table that is not newer than the running one.
    #[error("table version {offered} is not newer than the running version {current}")]
    StaleVersion {
        /// The running version.
        current: u64,
        /// The version offered.
        offered: u64,
    },
}

/// Self-source port allocation failures.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortError {
    /// No free self-source port above the server port on any SNAT address.
    #[error("no free self-source port above {above} for TM {tm} on {addresses} SNAT address(es)")]
    Exhausted {
        /// The server port the allocated port had to exceed.
        above: u16,
        /// The TM index.
        tm: usize,
        /// How many SNAT addresses were tried.
        addresses: usize,
    },
    /// A release for a port that is not allocated.
    #[error("port {port} on {addr} is not allocated")]
    NotAllocated {
        /// The SNAT address.
        addr: IpAddr,
        /// The port.
        port: u16,
    },
    /// The address is not one of the allocator's SNAT addresses.
    #[error("{0} is not a SNAT address of this allocator")]
    UnknownAddress(IpAddr),
    /// The TM index is not in the table.
    #[error("no traffic manager with index {0}")]
    NoSuchTm(usize),
    /// This node's TM id is not in the table.
    #[error("TM id {0} is not in the table")]
    NotInTable(u32),
    /// Self-port tables for different addresses or TMs were combined.
    #[error("self-port sets for different (address, TM) pairs cannot be combined")]
    Mismatch,
    /// The server's replies to every SNAT address land in another group
    /// than the TM's, whatever the port: no port can steer them home.
    #[error(
        "replies from {server} to SNAT address {addr} land in group #{lands_in}, not this TM's"
    )]
    ReplyElsewhere {
        /// The server.
        server: std::net::SocketAddr,
        /// The (last) SNAT address tried.
        addr: IpAddr,
        /// The index of the group the replies land in.
        lands_in: usize,
    },
}

/// Table-file problems: I/O, syntax, content, checksum.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file could not be read or written (the I/O error is part of the
    /// message, not a separate source, so it is printed once).
    #[error("{path}: {error}")]
    Io {
        /// File path.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The path is not a regular file (after following symbolic links): a
    /// directory, a FIFO, a device such as `/dev/zero`, a socket. Refused
    /// before anything is read from it.
    #[error("{path}: not a regular file ({kind}); a table file must be a regular file")]
    NotRegular {
        /// File path.
        path: String,
        /// What it is instead (`directory`, `FIFO`, `character device`, …).
        kind: &'static str,
    },
    /// The file is larger than a table file can be.
    #[error("{path}: larger than {max} bytes, the most a table file may be")]
    TooLarge {
        /// File path.
        path: String,
        /// The limit ([`crate::file::MAX_FILE_BYTES`]).
        max: u64,
    },
    /// The file is not valid TOML or does not have the table's shape.
    #[error("not a valid table file: {0}")]
    Syntax(String),
    /// The file declares a format this build does not read.
    #[error("format {found} is not supported (this build reads format {supported})")]
    UnsupportedFormat {
        /// The `format` value found.
        found: i64,
        /// The format this build reads.
        supported: u32,
    },
    /// A field has a bad value; `location` names it (`tm[2].mac`, `group 'web' entries row 3 column 7 (bucket 199)`).
    #[error("{location}: {message}")]
    Field {
        /// Where in the file.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// The content does not match its checksum (corruption or a hand edit).
    #[error("checksum mismatch: the file says {stored}, its content hashes to {computed} (corrupted, or edited by hand: check it, then `stdctl table seal`)")]
    Checksum {
        /// The checksum written in the file.
        stored: String,
        /// The checksum of the content.
        computed: String,
    },
    /// The content parsed but breaks a table invariant.
    #[error(transparent)]
    Table(#[from] TableError),
}
