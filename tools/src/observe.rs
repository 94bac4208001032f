//! stdctl's views of a running cluster for operators: `capture` (a distributor's live capture tap, as pcapng) and `explain` (where a flow goes on every distributor, why, and whether the owning TM's replies come back to it).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use admin_http::client::Endpoint;
use allocation::{file, AllocationTable, Flow, PortRange, SelfPorts, SteerBy};
use anyhow::{anyhow, bail, Context, Result};
use control::api::{DistributorTransition, TmSnat};
use serde::Serialize;
use serde_json::json;

use crate::cli::{CaptureArgs, ExplainArgs};
use crate::cluster::Cluster;
use crate::report::Out;

/// `%`-escapes a query value.
fn escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a capture stream held, block by block as it streamed.
#[derive(Debug, Default, Serialize)]
pub struct CaptureSummary {
    /// Frames written.
    pub frames: u64,
    /// Frames the kernel steered (their comment says `path=kernel`).
    pub kernel: u64,
    /// Frames the workers decided.
    pub worker: u64,
    /// The distributor's closing statistics (its drop counts), if it sent them.
    pub statistics: Option<String>,
    /// Bytes written.
    pub bytes: u64,
}

impl CaptureSummary {
    /// Reads the complete pcapng blocks at the start of `buf`; returns the
    /// bytes they take.
    fn blocks(&mut self, buf: &[u8]) -> Result<usize> {
        let mut at = 0;
        while let Some(head) = buf.get(at..at + 8) {
            let ty = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            if len < 12 || len % 4 != 0 {
                bail!("the capture stream is not pcapng (a block of {len} bytes)");
            }
            if buf.len() < at + len {
                break; // the rest of the block is still on its way
            }
            let body = &buf[at + 8..at + len - 4];
            match ty {
                6 => {
                    self.frames += 1;
                    let comment = epb_comment(body).unwrap_or_default();
                    if comment.starts_with("path=kernel") {
                        self.kernel += 1;
                    } else if comment.starts_with("path=worker") {
                        self.worker += 1;
                    }
                }
                5 => self.statistics = option_comment(body.get(12..).unwrap_or_default()),
                _ => {}
            }
            at += len;
        }
        Ok(at)
    }
}

/// The first comment among pcapng options.
fn option_comment(mut opts: &[u8]) -> Option<String> {
    while opts.len() >= 4 {
        let code = u16::from_le_bytes([opts[0], opts[1]]);
        let n = usize::from(u16::from_le_bytes([opts[2], opts[3]]));
        let value = opts.get(4..4 + n)?;
        if code == 1 {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        if code == 0 {
            return None;
        }
        opts = opts.get(4 + n.next_multiple_of(4)..)?;
    }
    None
}

/// An enhanced packet block's comment.
fn epb_comment(body: &[u8]) -> Option<String> {
    let held = u32::from_le_bytes(body.get(12..16)?.try_into().ok()?) as usize;
    option_comment(body.get(20 + held.next_multiple_of(4)..)?)
}

/// `stdctl capture`.
pub fn capture(a: &CaptureArgs, out: &Out) -> Result<()> {
    let c = Cluster::load(&a.cluster.cluster)?;
    let node = c
        .distributors
        .iter()
        .find(|d| d.name == a.node)
        .ok_or_else(|| {
            anyhow!(
                "no distributor '{}' in the cluster file (it has {})",
                a.node,
                c.distributors
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    if !(a.seconds > 0.0 && a.seconds <= 600.0) {
        bail!("--seconds {}: not in (0, 600]", a.seconds);
    }
    if !(a.sample > 0.0 && a.sample <= 1.0) {
        bail!("--sample {}: not in (0, 1]", a.sample);
    }
    let mut q = vec![
        format!("seconds={}", a.seconds),
        format!("sample={}", a.sample),
    ];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            q.push(format!("{k}={}", escape(&v)));
        }
    };
    add("tm", a.tm.clone());
    add("bucket", a.bucket.map(|b| b.to_string()));
    add("host", a.host.clone());
    add("port", a.port.map(|p| p.to_string()));
    add("proto", a.proto.clone());
    add("filter", a.filter.clone());
    add(
        "max_frames",
        (a.max_frames > 0).then(|| a.max_frames.to_string()),
    );
    let path = format!("/capture?{}", q.join("&"));
    let idle = Duration::from_millis(c.timeout_ms.max(1000)) + Duration::from_secs(2);
    let mut body = c
        .client()
        .stream(node, &path, idle)
        .map_err(|e| anyhow!("{}: GET /capture: {e}", node.name))?;
    let mut sink: Box<dyn Write> = if a.write == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&a.write).with_context(|| format!("cannot write {}", a.write))?,
        )
    };
    let mut summary = CaptureSummary::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => bail!("{}: the capture stream broke: {e}", node.name),
        };
        sink.write_all(&buf[..n])
            .and_then(|()| sink.flush())
            .with_context(|| format!("writing {}", a.write))?;
        summary.bytes += n as u64;
        pending.extend_from_slice(&buf[..n]);
        let used = summary.blocks(&pending)?;
        pending.drain(..used);
    }
    if !pending.is_empty() {
        bail!(
            "{}: the capture stream ended inside a block ({} bytes)",
            node.name,
            pending.len()
        );
    }
    let line = format!(
        "{}: {} frames ({} steered in the kernel, {} by the workers) to {}; {}",
        node.name,
        summary.frames,
        summary.kernel,
        summary.worker,
        if a.write == "-" {
            "standard output"
        } else {
            &a.write
        },
        summary
            .statistics
            .as_deref()
            .unwrap_or("no closing statistics (the stream was cut)")
    );
    if a.write == "-" {
        eprintln!("{line}");
    } else {
        out.emit(serde_json::to_value(&summary)?, || line);
    }
    Ok(())
}

/// The greater-port endpoint as text.
fn show(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V6(a) => format!("[{a}]:{port}"),
        a => format!("{a}:{port}"),
    }
}

/// One table's answer for a flow.
#[derive(Debug, Serialize)]
struct Steered {
    table: u64,
    group: String,
    by: String,
    bucket: Option<u16>,
    tm: String,
    tm_id: u32,
}

fn steered(t: &AllocationTable, flow: &Flow) -> Steered {
    let s = t.steer(flow);
    let tm = &t.tms()[usize::from(s.tm)];
    let (by, bucket) = match s.by {
        SteerBy::EqualPorts => (
            "equal ports: the group's predetermined TM".to_string(),
            None,
        ),
        SteerBy::Endpoint { bucket } => {
            let (a, p) = flow.greater_port_endpoint().unwrap_or((flow.src, 0));
            (
                format!("greater-port endpoint {}", show(a, p)),
                Some(bucket),
            )
        }
        SteerBy::Address { bucket } => (
            "the greater-port endpoint's address (source affinity)".to_string(),
            Some(bucket),
        ),
        SteerBy::NoPorts { bucket } => ("no ports: (src, dst, protocol)".to_string(), Some(bucket)),
    };
    Steered {
        table: t.version(),
        group: t.groups()[s.group].name.clone(),
        by,
        bucket,
        tm: tm.name.clone(),
        tm_id: tm.id,
    }
}

/// What one distributor does with the flow.
#[derive(Debug, Serialize)]
struct AtDistributor {
    distributor: String,
    running: Option<Steered>,
    /// During a transition: the previous table's answer.
    previous: Option<Steered>,
    /// Failed over: what the operator's table says.
    operator: Option<Steered>,
    phase: Option<String>,
    error: Option<String>,
}

/// A reply checked on every distributor.
#[derive(Debug, Serialize)]
struct ReplyCheck {
    server: String,
    snat: String,
    reply: String,
    /// (distributor, TM its running table names).
    steers_to: Vec<(String, String)>,
    ok: bool,
}

impl ReplyCheck {
    /// `distributor → TM, …`.
    fn where_to(&self) -> String {
        self.steers_to
            .iter()
            .map(|(d, t)| format!("{d} → {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The owning TM's side.
#[derive(Debug, Serialize)]
struct AtTm {
    tm: String,
    tm_id: u32,
    table_version: Option<u64>,
    range: Option<String>,
    /// (SNAT address, self-source ports under the TM's own table, the first few).
    selfports: Vec<(String, usize, Vec<u16>)>,
    replies: Vec<ReplyCheck>,
    error: Option<String>,
}

/// `stdctl explain`.
pub fn explain(a: &ExplainArgs, out: &Out) -> Result<()> {
    let c = Cluster::load(&a.cluster.cluster)?;
    let flow = crate::flow_arg(&a.src, &a.dst, &a.protocol)?;
    let client = c.client();
    let table = |node: &Endpoint, path: &str| -> Result<Option<AllocationTable>, String> {
        match client.request(
            node,
            "GET",
            &format!("{path}?{}", crate::cluster::WITH_KEY),
            None,
        ) {
            Ok((200, text)) => file::parse(&text)
                .map(Some)
                .map_err(|e| format!("GET {path}: {e}")),
            Ok((404, _)) => Ok(None),
            Ok((code, text)) => Err(format!("GET {path}: {code}: {}", text.trim())),
            Err(e) => Err(format!("GET {path}: {e}")),
        }
    };
    let mut dists = Vec::new();
    let mut tables: Vec<(String, AllocationTable)> = Vec::new();
    for d in &c.distributors {
        let mut at = AtDistributor {
            distributor: d.name.clone(),
            running: None,
            previous: None,
            operator: None,
            phase: None,
            error: None,
        };
        let r = (|| -> Result<(), String> {
            let t = table(d, "/table")?.ok_or("GET /table: 404")?;
            at.running = Some(steered(&t, &flow));
            tables.push((d.name.clone(), t));
            let st: DistributorTransition = client
                .ok_json(d, "GET", "/transition", None)
                .map_err(|e| format!("GET /transition: {e}"))?;
            at.phase = Some(format!("{:?}", st.state).to_lowercase());
            if st.previous_version.is_some() {
                if let Some(p) = table(d, "/table/previous")? {
                    at.previous = Some(steered(&p, &flow));
                }
            }
            if let Some(o) = table(d, "/table/operator")? {
                at.operator = Some(steered(&o, &flow));
            }
            Ok(())
        })();
        at.error = r.err();
        dists.push(at);
    }
    let owner = dists
        .iter()
        .find_map(|d| d.running.as_ref())
        .ok_or_else(|| {
            anyhow!(
                "no distributor answered: {:?}",
                dists.iter().map(|d| &d.error).collect::<Vec<_>>()
            )
        })?;
    let mut tm = AtTm {
        tm: owner.tm.clone(),
        tm_id: owner.tm_id,
        table_version: None,
        range: None,
        selfports: Vec::new(),
        replies: Vec::new(),
        error: None,
    };
    match c.tms.iter().find(|t| t.id == owner.tm_id) {
        None => tm.error = Some(format!("TM id {} is not in the cluster file", owner.tm_id)),
        Some(node) => {
            // The self-source ports are the TM's own table's, as it reports
            // it: not the distributors' (the two may differ; that is what
            // is being checked).
            let snat = client.ok_json::<TmSnat>(&node.node, "GET", "/snat", None);
            match (snat, table(&node.node, "/table")) {
                (Err(e), _) => tm.error = Some(format!("{}: GET /snat: {e}", node.node.name)),
                (_, Err(e)) => tm.error = Some(format!("{}: {e}", node.node.name)),
                (_, Ok(None)) => tm.error = Some(format!("{}: GET /table: 404", node.node.name)),
                (Ok(snat), Ok(Some(own))) => tm_side(&mut tm, &snat, &flow, &own, &tables),
            }
        }
    }
    let problems = problems(&dists, &tm, &tables);
    let value = json!({"flow": {"src": a.src, "dst": a.dst, "protocol": flow.protocol}, "distributors": dists, "tm": tm, "problems": problems});
    out.emit(value, || {
        let mut s = explain_text(&dists, &tm);
        for p in &problems {
            s += &format!("\nproblem: {p}");
        }
        s
    });
    match problems.len() {
        0 => Ok(()),
        1 => bail!("{}", problems[0]),
        n => bail!("{n} problems (see above): {}", problems[0]),
    }
}

/// What makes the answer not hold: a distributor not read, distributors
/// that steer the flow to different TMs, a TM that is not what the table
/// says or runs another table, a reply that would steer elsewhere.
fn problems(
    dists: &[AtDistributor],
    tm: &AtTm,
    tables: &[(String, AllocationTable)],
) -> Vec<String> {
    let mut out = Vec::new();
    for d in dists {
        if let Some(e) = &d.error {
            out.push(format!("{}: not read: {e}", d.distributor));
        }
    }
    let owners: Vec<String> = dists
        .iter()
        .filter_map(|d| {
            d.running
                .as_ref()
                .map(|r| format!("{} → {}", d.distributor, r.tm))
        })
        .collect();
    let mut tms: Vec<&str> = dists
        .iter()
        .filter_map(|d| d.running.as_ref().map(|r| r.tm.as_str()))
        .collect();
    tms.dedup();
    if tms.len() > 1 {
        out.push(format!(
            "the distributors steer this flow to different TMs ({}): they run different tables (stdctl status)",
            owners.join(", ")
        ));
    }
    if let Some(e) = &tm.error {
        out.push(format!("TM {}: {e}", tm.tm));
    }
    if let Some(v) = tm.table_version {
        let known = tables.iter().any(|(_, t)| t.version() == v)
            || dists
                .iter()
                .any(|d| d.previous.as_ref().is_some_and(|p| p.table == v));
        if !known {
            out.push(format!(
                "TM {} runs table {v}, no distributor does ({}): its self-source ports are its table's, the replies the distributors'",
                tm.tm,
                tables
                    .iter()
                    .map(|(d, t)| format!("{d}: {}", t.version()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for r in tm.replies.iter().filter(|r| !r.ok) {
        out.push(format!(
            "the reply {} would steer to another TM ({}), not {}",
            r.reply,
            r.where_to(),
            tm.tm
        ));
    }
    out
}

/// The TM's self-source ports and its replies under every distributor's table.
fn tm_side(
    tm: &mut AtTm,
    snat: &TmSnat,
    flow: &Flow,
    own: &AllocationTable,
    tables: &[(String, AllocationTable)],
) {
    tm.table_version = Some(snat.table_version);
    if own.version() != snat.table_version {
        tm.error = Some(format!(
            "answers GET /snat for table {} and GET /table with table {}",
            snat.table_version,
            own.version()
        ));
        return;
    }
    tm.range = Some(snat.range.clone());
    if snat.tm_id != tm.tm_id {
        tm.error = Some(format!(
            "the node answers as TM {} (the cluster file and the table say {})",
            snat.tm_id, tm.tm_id
        ));
        return;
    }
    let Ok(range) = snat.range.parse::<PortRange>() else {
        tm.error = Some(format!("unreadable port range {:?}", snat.range));
        return;
    };
    let Some(k) = own.tm_index_by_id(tm.tm_id) else {
        tm.error = Some(format!("TM id {} is not in its own table", tm.tm_id));
        return;
    };
    for a in &snat.addresses {
        match SelfPorts::build(own, a.address, k, range) {
            Ok(set) => tm.selfports.push((
                a.address.to_string(),
                set.iter().count(),
                set.iter().take(4).collect(),
            )),
            Err(e) => tm.error = Some(format!("self-source ports of {}: {e}", a.address)),
        }
    }
    for s in snat
        .servers
        .iter()
        .filter(|s| s.protocol == flow.protocol)
        .take(4)
    {
        let Some((addr, _, ports)) = tm.selfports.iter().find(|(a, _, _)| {
            a.parse::<IpAddr>()
                .is_ok_and(|a| a.is_ipv4() == s.server.is_ipv4())
        }) else {
            continue;
        };
        let Some(&port) = ports.iter().find(|&&p| p > s.server.port()) else {
            continue;
        };
        let Ok(snat_addr) = addr.parse::<IpAddr>() else {
            continue;
        };
        let reply = Flow::with_ports(s.protocol, s.server.ip(), s.server.port(), snat_addr, port);
        let steers_to: Vec<(String, String)> = tables
            .iter()
            .map(|(d, t)| (d.clone(), steered(t, &reply).tm))
            .collect();
        let ok = steers_to.iter().all(|(_, t)| *t == tm.tm);
        tm.replies.push(ReplyCheck {
            server: format!("{} ({}/{})", s.server, s.vs, s.pool),
            snat: show(snat_addr, port),
            reply: format!("{} → {}", s.server, show(snat_addr, port)),
            steers_to,
            ok,
        });
    }
}

fn steered_text(s: &Steered) -> String {
    format!(
        "table {}: group {}, {}{} → {} (id {})",
        s.table,
        s.group,
        s.by,
        s.bucket.map_or(String::new(), |b| format!(", bucket {b}")),
        s.tm,
        s.tm_id
    )
}

fn explain_text(dists: &[AtDistributor], tm: &AtTm) -> String {
    let mut s = String::new();
    for d in dists {
        s += &d.distributor;
        if let Some(p) = &d.phase {
            s += &format!(" ({p})");
        }
        s += ":\n";
        if let Some(e) = &d.error {
            s += &format!("  not read: {e}\n");
        }
        if let Some(r) = &d.running {
            s += &format!("  {}\n", steered_text(r));
        }
        if let Some(p) = &d.previous {
            s += &format!("  previous {}\n", steered_text(p));
            if d.running.as_ref().is_some_and(|r| r.tm != p.tm) {
                s += "  moved bucket: a flow seen starting (TCP SYN) goes to the new owner, one its old owner pinned or that started before stays there\n";
            }
        }
        if let Some(o) = &d.operator {
            s += &format!("  failed over from the operator's {}\n", steered_text(o));
        }
    }
    s += &format!("TM {} (id {})", tm.tm, tm.tm_id);
    if let Some(v) = tm.table_version {
        s += &format!(", running table {v}");
    }
    if let Some(r) = &tm.range {
        s += &format!(", self-source ports from {r}");
    }
    s += ":\n";
    if let Some(e) = &tm.error {
        s += &format!("  {e}\n");
    }
    for (a, n, first) in &tm.selfports {
        s += &format!("  SNAT {a}: {n} self-source ports, first {first:?}\n");
    }
    for r in &tm.replies {
        s += &format!(
            "  reply {}: {} — {}\n",
            r.reply,
            r.where_to(),
            if r.ok {
                "back to this TM"
            } else {
                "MISMATCH: not this TM"
            }
        );
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn escapes_filter_expressions() {
        assert_eq!(
            escape("tcp port 80 and host 10.0.0.1"),
            "tcp%20port%2080%20and%20host%2010.0.0.1"
        );
        assert_eq!(escape("a&b=c"), "a%26b%3Dc");
    }

    #[test]
    fn a_stream_is_read_block_by_block() -> Result<()> {
        // An SHB, then an EPB with a kernel comment, cut in the middle.
        let mut b = Vec::new();
        let block = |ty: u32, body: &[u8], out: &mut Vec<u8>| {
            let n = (12 + body.len()) as u32;
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(&n.to_le_bytes());
        };
        block(0x0a0d_0d0a, &[0; 16], &mut b);
        let mut epb = vec![0u8; 20];
        epb[12] = 4;
        epb.extend_from_slice(&[1, 2, 3, 4]);
        epb.extend_from_slice(&1u16.to_le_bytes());
        epb.extend_from_slice(&11u16.to_le_bytes());
        epb.extend_from_slice(b"path=kernel\0");
        epb.extend_from_slice(&[0; 4]);
        block(6, &epb, &mut b);
        let mut s = CaptureSummary::default();
        let cut = b.len() - 3;
        let used = s.blocks(&b[..cut])?;
        assert_eq!((s.frames, used), (0, 28));
        let used = s.blocks(&b[used..])?;
        assert_eq!((s.frames, s.kernel, used), (1, 1, b.len() - 28));
        assert!(s.blocks(&[1, 0, 0, 0, 5, 0, 0, 0]).is_err());
        Ok(())
    }
}
