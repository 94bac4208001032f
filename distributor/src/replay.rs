//! Capture replay: every frame of a capture through the real steering, one capture per TM out, and a summary with split flows.
//!
//! Without a distributor configuration every frame is taken as arriving on
//! the outside port addressed to the cluster (front role, the table's
//! groups as they are): its destination MAC is set to the group MAC before
//! steering. This checks a table against any capture. A flow whose two
//! directions were steered to different TMs is a *split flow*; for captures
//! without NAT there must be none.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use allocation::{AllocationTable, HashKey, MacAddr, TmIndex};
use serde::Serialize;
use thiserror::Error;

use crate::pcap::{PcapError, Reader, Record, Writer};
use crate::steer::{Plan, PortKind};
use crate::verdict::{Action, Branch, Drop, PortId};
use crate::wire::{self, ethertype, EthernetFrame};
use crate::worker::{Worker, WorkerConfig};

/// The group MAC replay steers to (any unicast address would do).
pub const REPLAY_GROUP_MAC: MacAddr = MacAddr([0x02, 0x53, 0x54, 0x44, 0x00, 0x01]);

/// Replay failures.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The capture could not be read.
    #[error("capture: {0}")]
    Capture(#[from] PcapError),
    /// The steering plan could not be built from the table.
    #[error("plan: {0}")]
    Plan(#[from] crate::steer::PlanError),
    /// An output file could not be written.
    #[error("{path}: {error}")]
    Output {
        /// The file.
        path: String,
        /// What went wrong.
        error: std::io::Error,
    },
}

/// Per-TM results.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TmSummary {
    /// TM index.
    pub index: usize,
    /// TM id.
    pub id: u32,
    /// TM name.
    pub name: String,
    /// TM MAC.
    pub mac: String,
    /// Frames steered to it.
    pub packets: u64,
    /// Bytes steered to it.
    pub bytes: u64,
    /// Its capture file (in the output directory).
    pub file: String,
}

/// Flow accounting.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FlowSummary {
    /// Distinct flows steered by a hash or the equal-ports rule.
    pub seen: u64,
    /// Of those, flows seen in both directions.
    pub both_directions: u64,
    /// Flows whose frames went to more than one TM (must be 0 without NAT).
    pub split: u64,
    /// Up to ten split flows, described.
    pub split_examples: Vec<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Version of the table used.
    pub table_version: u64,
    /// Frames read.
    pub frames: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Per TM.
    pub tms: Vec<TmSummary>,
    /// Frames per steering branch.
    pub branches: std::collections::BTreeMap<String, u64>,
    /// Frames dropped, per reason.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Frames not steered to a TM: bridged or flooded, answered, or given to every TM.
    pub not_steered: u64,
    /// Fragments still held at the end (their first fragment never came).
    pub held_at_end: u64,
    /// Flow accounting.
    pub flows: FlowSummary,
    /// Set when the capture ends inside a record: the whole records before
    /// it were all replayed, the cut one was not.
    pub truncated_tail: Option<TruncatedTail>,
}

/// The record a capture ends inside.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TruncatedTail {
    /// Its number (0-based): the number of whole records before it.
    pub record: u64,
    /// Byte offset of its header in the capture.
    pub offset: u64,
    /// Bytes of it the capture holds (header included).
    pub present: u64,
    /// Bytes it needs (header included; 16 when the header itself is cut).
    pub expected: u64,
}

/// A direction-free flow key: protocol and the two endpoints, lesser first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowKey {
    proto: u8,
    a: (IpAddr, u16),
    b: (IpAddr, u16),
}

/// The flow of a whole packet or first fragment, and its direction bit.
fn flow_of(frame: &[u8]) -> Option<(FlowKey, u8)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let l3 = &frame[eth.payload_offset()..];
    let ip = match eth.ethertype() {
        ethertype::IPV4 => wire::parse_ipv4(l3).ok()?,
        ethertype::IPV6 => wire::parse_ipv6(l3).ok()?,
        _ => return None,
    };
    let (sp, dp) = if wire::has_ports(ip.proto) {
        wire::ports(&l3[ip.l4.min(ip.end)..ip.end])?
    } else {
        (0, 0)
    };
    let (s, d) = ((ip.src, sp), (ip.dst, dp));
    Some(if s <= d {
        (
            FlowKey {
                proto: ip.proto,
                a: s,
                b: d,
            },
            1,
        )
    } else {
        (
            FlowKey {
                proto: ip.proto,
                a: d,
                b: s,
            },
            2,
        )
    })
}

struct FlowState {
    tm: TmIndex,
    dirs: u8,
    split: bool,
}

fn file_name(id: u32, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("tm-{id}-{clean}.pcap")
}

/// How the frames of a capture enter the steering.
#[derive(Debug, Clone)]
pub struct ReplaySetup {
    /// The plan (table, group MAC, cluster addresses, ports).
    pub plan: Plan,
    /// The port every frame arrives on.
    pub ingress: PortId,
    /// Address every frame to the group MAC first (no configuration known).
    pub to_cluster: bool,
}

impl ReplaySetup {
    /// Without a distributor configuration: one outside port, one port per
    /// TM, and every frame addressed to the cluster.
    pub fn assumed(table: AllocationTable) -> Result<Self, ReplayError> {
        let n = table.tms().len();
        let mut ports = vec![PortKind::Outside];
        ports.extend(std::iter::repeat_n(PortKind::Tm, n));
        let map: Vec<(u32, u16)> = table
            .tms()
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id, i as u16 + 1))
            .collect();
        Ok(ReplaySetup {
            plan: Plan::new(table, REPLAY_GROUP_MAC, &[], ports, &map)?,
            ingress: 0,
            to_cluster: true,
        })
    }
}

/// Replays the capture `input` against `table` without a configuration
/// ([`ReplaySetup::assumed`]); see [`replay_with`].
pub fn replay<R: Read>(
    table: AllocationTable,
    input: R,
    out_dir: &Path,
) -> Result<Summary, ReplayError> {
    replay_with(ReplaySetup::assumed(table)?, input, out_dir)
}

/// Replays the capture `input` through `setup`, writing `tm-<id>-<name>.pcap`
/// for every TM and `summary.json` into `out_dir` (created if missing).
pub fn replay_with<R: Read>(
    setup: ReplaySetup,
    input: R,
    out_dir: &Path,
) -> Result<Summary, ReplayError> {
    let out_err = |path: &Path| {
        let path = path.display().to_string();
        move |error| ReplayError::Output {
            path: path.clone(),
            error,
        }
    };
    std::fs::create_dir_all(out_dir).map_err(out_err(out_dir))?;
    let ReplaySetup {
        plan,
        ingress,
        to_cluster,
    } = setup;
    let n = plan.table().tms().len();
    let tm_info: Vec<(u32, String, MacAddr)> = plan
        .table()
        .tms()
        .iter()
        .map(|t| (t.id, t.name.clone(), t.mac))
        .collect();
    let version = plan.table().version();
    let mut writers = Vec::with_capacity(n);
    let mut files = Vec::with_capacity(n);
    for (id, name, _) in &tm_info {
        let f = file_name(*id, name);
        let path: PathBuf = out_dir.join(&f);
        let file = File::create(&path).map_err(out_err(&path))?;
        writers.push((
            Writer::new(BufWriter::new(file)).map_err(out_err(&path))?,
            path,
        ));
        files.push(f);
    }
    let mut reader = Reader::new(input)?;
    let mut worker = Worker::new(WorkerConfig::default(), HashKey::from_bytes([0x5a; 16]));
    let mut flows: HashMap<FlowKey, FlowState> = HashMap::new();
    let (mut frames, mut bytes, mut not_steered) = (0u64, 0u64, 0u64);
    let mut summary_flows = FlowSummary::default();
    let mut buf = vec![0u8; crate::pcap::MAX_RECORD as usize + 128];
    let mut truncated_tail = None;
    let mut rec = Record::default();
    loop {
        match reader.next_into(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            // A cut last record ends the capture: what came before is replayed.
            Err(PcapError::Truncated {
                index,
                offset,
                present,
                expected,
            }) => {
                truncated_tail = Some(TruncatedTail {
                    record: index,
                    offset,
                    present,
                    expected,
                });
                break;
            }
            Err(e) => return Err(e.into()),
        }
        frames += 1;
        bytes += rec.data.len() as u64;
        let len = rec.data.len();
        buf[..len].copy_from_slice(&rec.data);
        if to_cluster && len >= 6 {
            wire::set_dst_mac(&mut buf, plan.group_mac());
        }
        let action = worker.process(&mut buf, len, ingress, &plan, rec.ts_ns);
        match action {
            Action::ToTm { tm, .. } => {
                let (w, path) = &mut writers[usize::from(tm)];
                w.write(rec.ts_ns, rec.orig_len, &buf[..len])
                    .map_err(out_err(path))?;
                let flow_branch = matches!(
                    worker.last_branch(),
                    Some(Branch::Endpoint | Branch::Address | Branch::EqualPorts | Branch::NoPorts)
                );
                if let Some((key, dir)) = flow_branch.then(|| flow_of(&buf[..len])).flatten() {
                    let st = flows.entry(key).or_insert(FlowState {
                        tm,
                        dirs: 0,
                        split: false,
                    });
                    st.dirs |= dir;
                    if st.tm != tm && !st.split {
                        st.split = true;
                        summary_flows.split += 1;
                        if summary_flows.split_examples.len() < 10 {
                            summary_flows.split_examples.push(format!(
                                "{} {}:{} <-> {}:{} went to {} and {}",
                                allocation::rules::proto::name(key.proto),
                                key.a.0,
                                key.a.1,
                                key.b.0,
                                key.b.1,
                                tm_info[usize::from(st.tm)].1,
                                tm_info[usize::from(tm)].1
                            ));
                        }
                    }
                }
            }
            Action::Held | Action::Drop(_) => {}
            // A copy to two TMs happens only during a transition, which replay never runs.
            Action::Forward(_)
            | Action::Flood
            | Action::ToAllTms
            | Action::Reply { .. }
            | Action::ToTmAndCopy { .. } => not_steered += 1,
        }
        let mut failed = None;
        worker.drain_released(&plan, |frame, a| {
            if let Action::ToTm { tm, .. } = a {
                let (w, path) = &mut writers[usize::from(tm)];
                if let Err(e) = w.write(rec.ts_ns, frame.len() as u32, frame) {
                    failed = Some(out_err(path)(e));
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        worker.tick(rec.ts_ns);
    }
    let held_at_end = worker.fragments_held() as u64;
    for (w, path) in writers {
        w.into_inner().map_err(out_err(&path))?;
    }
    summary_flows.seen = flows.len() as u64;
    summary_flows.both_directions = flows.values().filter(|f| f.dirs == 3).count() as u64;
    let c = &worker.counters;
    let summary = Summary {
        table_version: version,
        frames,
        bytes,
        tms: tm_info
            .iter()
            .enumerate()
            .map(|(i, (id, name, mac))| TmSummary {
                index: i,
                id: *id,
                name: name.clone(),
                mac: mac.to_string(),
                packets: c.tm_packets.get(i).copied().unwrap_or(0),
                bytes: c.tm_bytes.get(i).copied().unwrap_or(0),
                file: files[i].clone(),
            })
            .collect(),
        branches: Branch::ALL
            .iter()
            .map(|&b| (b.name().to_string(), c.of_branch(b)))
            .collect(),
        drops: Drop::ALL
            .iter()
            .map(|&d| (d.name().to_string(), c.of_drop(d)))
            .collect(),
        not_steered,
        held_at_end,
        flows: summary_flows,
        truncated_tail,
    };
    let path = out_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(out_err(&path))?;
    Ok(summary)
}
