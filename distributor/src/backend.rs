//! The pcap backends: capture files (replay inputs, write one capture per port) and live interfaces through libpcap.
//!
//! The live backend captures inbound frames only (`PCAP_D_IN`): libpcap
//! sees both directions by default, and a forwarder that captured its own
//! output would forward it again. It sends with one syscall per frame —
//! the ceiling of this backend (a batched Linux backend is the fast path).

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::Path;
use std::time::Duration;

use crate::io::{Backend, Batch};
use crate::pcap::{PcapError, Reader, Record, Writer};
use crate::verdict::PortId;

fn pcap_io(e: PcapError) -> io::Error {
    match e {
        PcapError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// An open input capture and its next record (read ahead to merge by time).
type Input = (Reader<BufReader<File>>, Option<Record>);

/// Capture files: each port may read frames from an input capture and
/// write the frames sent out of it to an output capture. Inputs are merged
/// in timestamp order.
#[derive(Debug)]
pub struct PcapFileBackend {
    inputs: Vec<Option<Input>>,
    outputs: Vec<Option<Writer<BufWriter<File>>>>,
    now_ts: u64,
}

impl PcapFileBackend {
    /// Opens the inputs and creates the outputs, one pair per port.
    pub fn open(ports: &[(Option<&Path>, Option<&Path>)]) -> io::Result<Self> {
        let mut inputs = Vec::with_capacity(ports.len());
        let mut outputs = Vec::with_capacity(ports.len());
        for &(input, output) in ports {
            inputs.push(match input {
                Some(p) => {
                    let f = File::open(p)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                    let mut r = Reader::new(BufReader::new(f)).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
                    })?;
                    let first = r.next_record().map_err(pcap_io)?;
                    Some((r, first))
                }
                None => None,
            });
            outputs.push(match output {
                Some(p) => {
                    let f = File::create(p)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                    Some(Writer::new(BufWriter::new(f))?)
                }
                None => None,
            });
        }
        Ok(PcapFileBackend {
            inputs,
            outputs,
            now_ts: 0,
        })
    }
}

impl Backend for PcapFileBackend {
    fn ports(&self) -> usize {
        self.inputs.len()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        while batch.len() < batch.capacity() {
            // The input whose next record is the earliest.
            let next = self
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(i, inp)| {
                    inp.as_ref()
                        .and_then(|(_, r)| r.as_ref().map(|r| (r.ts_ns, i)))
                })
                .min();
            let Some((_, port)) = next else { break };
            let Some((reader, slot)) = self.inputs[port].as_mut() else {
                break;
            };
            let rec = slot.take();
            *slot = reader.next_record().map_err(pcap_io)?;
            if let Some(rec) = rec {
                self.now_ts = rec.ts_ns;
                batch.push(port as PortId, rec.ts_ns, &rec.data);
            }
        }
        Ok(batch.len())
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        match self.outputs.get_mut(usize::from(port)) {
            Some(Some(w)) => w.write(self.now_ts, frame.len() as u32, frame),
            _ => Ok(()), // a port without an output capture: the frame leaves nowhere, as on an unplugged link
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for w in self.outputs.iter_mut().flatten() {
            w.flush()?;
        }
        Ok(())
    }

    fn finished(&self) -> bool {
        self.inputs
            .iter()
            .all(|i| i.as_ref().is_none_or(|(_, r)| r.is_none()))
    }
}

/// Live interfaces through libpcap, one capture handle per port.
pub struct PcapBackend {
    caps: Vec<pcap::Capture<pcap::Active>>,
    names: Vec<String>,
    idle: Duration,
}

impl std::fmt::Debug for PcapBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PcapBackend({:?})", self.names)
    }
}

impl PcapBackend {
    /// Opens every interface: promiscuous, immediate mode, inbound only,
    /// non-blocking; `idle` is the pause when no port has a frame.
    pub fn open(interfaces: &[&str], idle: Duration) -> io::Result<Self> {
        let mut caps = Vec::with_capacity(interfaces.len());
        for &name in interfaces {
            let fail = |e: pcap::Error| io::Error::other(format!("{name}: {e}"));
            let cap = pcap::Capture::from_device(name)
                .map_err(fail)?
                .promisc(true)
                .immediate_mode(true)
                .snaplen(65535)
                .buffer_size(8 << 20)
                .open()
                .map_err(fail)?;
            cap.direction(pcap::Direction::In).map_err(fail)?;
            let cap = cap.setnonblock().map_err(fail)?;
            caps.push(cap);
        }
        Ok(PcapBackend {
            caps,
            names: interfaces.iter().map(|s| s.to_string()).collect(),
            idle,
        })
    }
}

impl Backend for PcapBackend {
    fn ports(&self) -> usize {
        self.caps.len()
    }

    fn dropped(&mut self) -> u64 {
        // libpcap's running totals: dropped for want of buffer room, and
        // by the interface.
        self.caps
            .iter_mut()
            .filter_map(|c| c.stats().ok())
            .map(|s| u64::from(s.dropped) + u64::from(s.if_dropped))
            .sum()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        // Round-robin over the ports so that a busy one does not starve the others.
        let mut progress = true;
        while progress && batch.len() < batch.capacity() {
            progress = false;
            for (port, cap) in self.caps.iter_mut().enumerate() {
                match cap.next_packet() {
                    Ok(p) => {
                        let ts = p.header.ts;
                        let ts_ns = (ts.tv_sec as u64)
                            .wrapping_mul(1_000_000_000)
                            .wrapping_add(ts.tv_usec as u64 * 1000);
                        batch.push(port as PortId, ts_ns, p.data);
                        progress = true;
                        if batch.len() == batch.capacity() {
                            break;
                        }
                    }
                    Err(pcap::Error::TimeoutExpired) | Err(pcap::Error::NoMorePackets) => {}
                    Err(e) => return Err(io::Error::other(format!("{}: {e}", self.names[port]))),
                }
            }
        }
        if batch.is_empty() {
            std::thread::sleep(self.idle);
        }
        Ok(batch.len())
    }

    fn send(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
        let cap = self
            .caps
            .get_mut(usize::from(port))
            .ok_or_else(|| io::Error::other(format!("no port {port}")))?;
        cap.sendpacket(frame)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
