//! The pcap backends: capture files (replay inputs, write one capture per port) and live interfaces through libpcap.
//!
//! The live backend captures inbound frames only (`PCAP_D_IN`): libpcap
//! sees both directions by default, and a forwarder that captured its own
//! output would forward it again. It sends with one syscall per frame —
//! the ceiling of this backend (a batched Linux backend is the fast path).

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::io::{Backend, Batch};
use crate::pcap::{PcapError, Reader, Record, Writer};
use crate::verdict::PortId;

/// An open input capture, its next record (read ahead to merge by time)
/// and its path (for messages).
#[derive(Debug)]
struct Input {
    reader: Reader<BufReader<File>>,
    /// The next record (its buffer reused record after record), if any.
    next: Record,
    has_next: bool,
    path: PathBuf,
}

impl Input {
    /// Reads ahead one record. A capture that ends inside a record (still
    /// being written, or a copy cut short) ends there: the whole records
    /// before it are all delivered, the cut one is counted in `truncated`
    /// and logged with its byte offset. Other read errors end the input too
    /// and are returned.
    fn advance(&mut self, truncated: &mut u64) -> io::Result<()> {
        self.has_next = false;
        self.has_next = match self.reader.next_into(&mut self.next) {
            Ok(got) => got,
            Err(PcapError::Truncated {
                index,
                offset,
                present,
                expected,
            }) => {
                *truncated += 1;
                log::warn!(
                    "{}: the capture ends inside record {index} (at byte offset {offset}: {present} of its {expected} bytes present); the {index} whole records before it are used, the cut one is dropped",
                    self.path.display()
                );
                false
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: at byte offset {}: {e}",
                        self.path.display(),
                        self.reader.offset()
                    ),
                ));
            }
        };
        Ok(())
    }
}

/// Capture files: each port may read frames from an input capture and
/// write the frames sent out of it to an output capture. Inputs are merged
/// in timestamp order.
///
/// An input whose last record is cut short ends with the record before it;
/// the cut records are [`Backend::dropped`] frames (`std_backend_drops_total`).
#[derive(Debug)]
pub struct PcapFileBackend {
    inputs: Vec<Option<Input>>,
    outputs: Vec<Option<Writer<BufWriter<File>>>>,
    now_ts: u64,
    truncated: u64,
    /// A read error met while filling a batch, returned by the next `recv`
    /// so that the frames already in the batch are steered first.
    pending: Option<io::Error>,
}

impl PcapFileBackend {
    /// Opens the inputs and creates the outputs, one pair per port.
    pub fn open(ports: &[(Option<&Path>, Option<&Path>)]) -> io::Result<Self> {
        let mut inputs = Vec::with_capacity(ports.len());
        let mut outputs = Vec::with_capacity(ports.len());
        let mut truncated = 0;
        for &(input, output) in ports {
            inputs.push(match input {
                Some(p) => {
                    let f = File::open(p)
                        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                    let reader = Reader::new(BufReader::new(f)).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
                    })?;
                    let mut input = Input {
                        reader,
                        next: Record::default(),
                        has_next: false,
                        path: p.to_path_buf(),
                    };
                    input.advance(&mut truncated)?;
                    Some(input)
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
            truncated,
            pending: None,
        })
    }
}

impl Backend for PcapFileBackend {
    fn ports(&self) -> usize {
        self.inputs.len()
    }

    fn recv(&mut self, batch: &mut Batch) -> io::Result<usize> {
        batch.clear();
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        while batch.len() < batch.capacity() {
            // The input whose next record is the earliest.
            let next = self
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(i, inp)| {
                    inp.as_ref()
                        .and_then(|inp| inp.has_next.then_some((inp.next.ts_ns, i)))
                })
                .min();
            let Some((_, port)) = next else { break };
            let Some(input) = self.inputs[port].as_mut() else {
                break;
            };
            if input.has_next {
                self.now_ts = input.next.ts_ns;
                batch.push(port as PortId, input.next.ts_ns, &input.next.data);
            }
            let read = input.advance(&mut self.truncated);
            if let Err(e) = read {
                if batch.is_empty() {
                    return Err(e);
                }
                self.pending = Some(e);
                break;
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

    fn dropped(&mut self) -> u64 {
        self.truncated
    }

    fn finished(&self) -> bool {
        self.pending.is_none()
            && self
                .inputs
                .iter()
                .all(|i| i.as_ref().is_none_or(|i| !i.has_next))
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
