//! Command-line interface of stdctl: every subcommand, argument and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// stdctl — build, inspect, rebalance and check the allocation tables of a
/// statistical traffic distributor cluster.
#[derive(Debug, Parser)]
#[command(name = "stdctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Man pages and shell completions (what the package ships).
    #[command(hide = true)]
    Generate(cli_common::generate::GenerateArgs),
    /// Create, show, verify, compare and seal table files.
    #[command(subcommand)]
    Table(TableCmd),
    /// Which endpoint a flow hashes on and which TM gets it.
    Lookup(LookupArgs),
    /// The self-source ports of a TM for a SNAT address.
    Selfports(SelfportsArgs),
    /// Rebalance a table to a profile, moving the fewest buckets.
    Rebalance(RebalanceArgs),
    /// Add or remove a traffic manager (offline, on a table file).
    #[command(subcommand)]
    Tm(TmCmd),
    /// Partition the TMs: make a new group (offline, on a table file).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Show (and optionally write) the failover table for failed TMs.
    Failover(FailoverArgs),
    /// A running cluster: every node's health, table version, transition and load share.
    Status(ClusterArg),
    /// Install a table on a running cluster with the transition protocol
    /// (prepare every TM, switch and open every distributor, drain, commit;
    /// roll back if a node fails before the commit).
    Push(PushArgs),
    /// Put an earlier committed table's contents back, as a new version,
    /// with the same transition protocol (the distributors keep the last
    /// committed tables beside their table file).
    Rollback(RollbackArgs),
    /// A transition an earlier push left half done (its coordinator died,
    /// or stopped): finish it, or take every node out of it.
    #[command(subcommand)]
    Transition(TransitionCmd),
    /// Abort the transition a running cluster is in: every distributor and
    /// TM goes back to its previous table (nodes committed already stay).
    Abort(ClusterArg),
    /// A live capture on a running distributor, as pcapng: every frame it
    /// steers (those its XDP program steers in the kernel included), each
    /// annotated with its decision (branch, group, bucket, TM, table,
    /// kernel or worker path) in its comment.
    Capture(CaptureArgs),
    /// Where a flow goes on every distributor of a running cluster and why
    /// (group, hashed endpoint, bucket, TM; under both tables during a
    /// transition), and the owning TM's self-source ports for it, its
    /// replies checked against every distributor's table.
    Explain(ExplainArgs),
    /// A live view of a running cluster, refreshed: each TM's share of its
    /// group's frames against its target, frames/s, connections; each
    /// distributor's table, transition, drops and failovers.
    Top(TopArgs),
    /// Samples a running cluster for a while and writes an SVG of every
    /// TM's share of its group against its target over that time.
    Plot(PlotArgs),
    /// The persistence bindings every TM holds (virtual servers with
    /// persistence, buddy groups), with their hit, miss and rebind counts.
    Persistence(PersistenceArgs),
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// The distributor (its name in the cluster file).
    #[arg(long)]
    pub node: String,
    /// Where the pcapng goes; `-` for standard output (`| tcpdump -r -`).
    #[arg(short = 'w', long = "write")]
    pub write: String,
    /// Only frames steered to this TM (name or id).
    #[arg(long)]
    pub tm: Option<String>,
    /// Only frames of flows in this bucket (0..4095).
    #[arg(long)]
    pub bucket: Option<u16>,
    /// Only frames from or to this address.
    #[arg(long)]
    pub host: Option<String>,
    /// Only frames from or to this port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only this protocol: tcp, udp, icmp, icmp6 or a number.
    #[arg(long)]
    pub proto: Option<String>,
    /// A BPF filter expression (tcpdump's syntax) over each frame as it
    /// leaves (the TM's MAC written).
    #[arg(long)]
    pub filter: Option<String>,
    /// The share of frames taken, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub sample: f64,
    /// How long, seconds (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Stop after this many frames (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_frames: u64,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Source endpoint: ADDR:PORT, [V6ADDR]:PORT, or a bare address for protocols without ports.
    pub src: String,
    /// Destination endpoint, same forms.
    pub dst: String,
    /// IP protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Seconds between refreshes (0.1 to 3600).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many views (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// How long to sample, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Seconds between samples (0.1 to 3600).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// The SVG file to write.
    #[arg(short = 'o', long)]
    pub output: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct PersistenceArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Only this TM (id or name as in the cluster file).
    #[arg(long)]
    pub tm: Option<String>,
}

/// The cluster file.
#[derive(Debug, Clone, Args)]
pub struct ClusterArg {
    /// Cluster file: every distributor's and TM's admin endpoint (docs/stdctl.md).
    #[arg(long)]
    pub cluster: PathBuf,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The table file to install (version newer than the running one; or
    /// the table of a transition an earlier push left unfinished: resumed).
    pub table: PathBuf,
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Commit when the drain window ends even if some TM's state is unknown
    /// (by default the push stops there, the cluster left switched).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TransitionCmd {
    /// Push again the table the first distributor is switched to (or that a
    /// TM is still prepared for after an unfinished commit): the push
    /// resumes where the nodes are.
    Resume {
        #[command(flatten)]
        cluster: ClusterArg,
        /// As for push: commit when the drain window ends even if some
        /// TM's state is unknown.
        #[arg(long)]
        force: bool,
    },
    /// The same as `stdctl abort`.
    Abort(ClusterArg),
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// The committed version to go back to (default: the newest one older
    /// than the running table).
    #[arg(long)]
    pub to: Option<u64>,
    /// As for push: commit when the drain window ends even if some TM's
    /// state is unknown.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct TmClusterArgs {
    /// TM id or name.
    pub tm: String,
    #[command(flatten)]
    pub cluster: ClusterArg,
    /// Print what would move; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum TableCmd {
    /// Build a new table file.
    New(NewArgs),
    /// Per-TM entries, share versus target and a histogram.
    Show {
        /// Table file.
        file: PathBuf,
    },
    /// Check a table file (syntax, invariants, checksum).
    Verify {
        /// Table file.
        file: PathBuf,
    },
    /// Buckets moved between two tables and per-TM deltas.
    Diff {
        /// The old table.
        old: PathBuf,
        /// The new table.
        new: PathBuf,
    },
    /// Recompute the checksum of a deliberately edited file (after full validation).
    Seal {
        /// Table file (rewritten in place).
        file: PathBuf,
    },
}

/// Profile selection shared by `table new` and `rebalance`.
#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    /// Profile: how entries are shared among TMs.
    #[arg(long, value_enum, default_value_t = ProfileName::Uniform)]
    pub profile: ProfileName,
    /// Gaussian centre, in TM positions (default: the middle).
    #[arg(long, allow_negative_numbers = true)]
    pub mean: Option<f64>,
    /// Gaussian or Rayleigh spread, in TM positions (default: number of TMs / 4).
    #[arg(long, allow_negative_numbers = true)]
    pub sigma: Option<f64>,
    /// Comma-separated weights: TM capacities (integers) for `weighted`,
    /// the profile itself for `custom`.
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfileName {
    Uniform,
    Weighted,
    Gaussian,
    Rayleigh,
    Custom,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Number of traffic managers (1 to 4096).
    #[arg(long)]
    pub tms: usize,
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// MAC address of the first TM; TM i gets this plus i.
    #[arg(long, default_value = "02:53:54:00:00:01")]
    pub mac_base: String,
    /// Hash key as 32 hex digits (default: fresh random key).
    #[arg(long)]
    pub key: Option<String>,
    /// Table version.
    #[arg(long, default_value_t = 1)]
    pub table_version: u64,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// Source endpoint: ADDR:PORT, [V6ADDR]:PORT, or a bare address for protocols without ports.
    pub src: String,
    /// Destination endpoint, same forms.
    pub dst: String,
    /// IP protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
}

#[derive(Debug, Args)]
pub struct SelfportsArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// SNAT address.
    #[arg(long)]
    pub addr: String,
    /// TM id or name.
    #[arg(long)]
    pub tm: String,
    /// Only ports above this server port.
    #[arg(long, default_value_t = 0)]
    pub above: u16,
    /// Port range the TM allocates from.
    #[arg(long, default_value = "1024-65535")]
    pub range: String,
    /// Print only how many ports there are.
    #[arg(long)]
    pub count: bool,
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Table file (offline).
    #[arg(long, conflicts_with = "cluster", required_unless_present = "cluster")]
    pub table: Option<PathBuf>,
    /// Cluster file: rebalance the running cluster (its table, pushed with the transition protocol).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// With --cluster: print what would move; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Group to rebalance (default: the default group).
    #[arg(long)]
    pub group: Option<String>,
    /// Output file (the new table, version + 1). Without it, only the plan
    /// is printed. With --cluster: the table pushed (with --dry-run: that
    /// would be pushed).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TmCmd {
    /// Add a TM and rebalance its group to the group's profile.
    Add(TmAddArgs),
    /// Remove a TM; only its buckets (and what the profile needs) move.
    Remove(TmRemoveArgs),
    /// Take a TM out of a running cluster: its share goes to 0 with the
    /// transition protocol; its open connections finish where they are.
    Drain(TmClusterArgs),
    /// Put a drained or failed TM back into a running cluster (its share of the profile).
    Readmit(TmClusterArgs),
}

#[derive(Debug, Args)]
pub struct TmAddArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// Name of the new TM.
    #[arg(long)]
    pub name: String,
    /// MAC address of the new TM.
    #[arg(long)]
    pub mac: String,
    /// Stable id (default: one above the largest).
    #[arg(long)]
    pub id: Option<u32>,
    /// Capacity weight.
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Group (default: the default group).
    #[arg(long)]
    pub group: Option<String>,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// A new group of existing TMs: their buckets in their old groups go
    /// to those groups' other TMs (the fewest moves), the new group's are
    /// laid out by its profile.
    Add(GroupAddArgs),
}

#[derive(Debug, Args)]
pub struct GroupAddArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// The new group's name.
    #[arg(long)]
    pub name: String,
    /// A rule selecting the group's traffic (repeat for several; any one
    /// matching selects it): comma-separated `protocol=tcp|udp|icmp|N`,
    /// `ports=443` or `ports=8000-8999`, `prefix=192.0.2.0/24`, each
    /// optional, at least one. Direction-free: either port, either address.
    #[arg(long = "rule", required = true)]
    pub rules: Vec<String>,
    /// Its TMs: ids or names, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tms: Vec<String>,
    /// `endpoint` (default) or `address` (source affinity; its TMs must
    /// keep client addresses: DNAT-only, docs/tmd.md).
    #[arg(long, default_value = "endpoint")]
    pub hash: String,
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct TmRemoveArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// TM id or name.
    #[arg(long)]
    pub tm: String,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Table file.
    #[arg(long)]
    pub table: PathBuf,
    /// Failed TMs: ids or names, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tm: Vec<String>,
    /// Write the failover table here.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}
