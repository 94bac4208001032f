//! Classic pcap capture files: a streaming reader (either byte order, µs or ns timestamps) and a writer, safe Rust, no libpcap.
//!
//! Only Ethernet captures (link type 1) are read: the distributor steers
//! Ethernet frames. pcapng files are recognised and refused with a hint.

use std::io::{self, Read, Write};

use thiserror::Error;

/// Link type of Ethernet captures.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// Largest record accepted (jumbo frames with room to spare).
pub const MAX_RECORD: u32 = 256 * 1024;

/// Capture-file problems.
#[derive(Debug, Error)]
pub enum PcapError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a classic pcap file.
    #[error("not a pcap file (magic {0:#010x})")]
    BadMagic(u32),
    /// A pcapng file.
    #[error("pcapng is not supported: convert it first, e.g. `editcap -F pcap in.pcapng out.pcap` or `tcpdump -r in.pcapng -w out.pcap`")]
    Pcapng,
    /// A link type other than Ethernet.
    #[error("link type {0} is not Ethernet (1)")]
    LinkType(u32),
    /// A record header claims more bytes than allowed.
    #[error("record {index} claims {len} bytes (the most accepted is {MAX_RECORD})")]
    RecordTooLarge {
        /// Record number (0-based).
        index: u64,
        /// Claimed length.
        len: u32,
    },
    /// The file ends inside a record (a capture still being written, a copy
    /// cut short): the records before it are whole and were returned.
    #[error("the file ends inside record {index} (at byte offset {offset}: {present} of its {expected} bytes present)")]
    Truncated {
        /// Record number (0-based).
        index: u64,
        /// Byte offset of the record's header in the file.
        offset: u64,
        /// Bytes of the record (header included) the file holds.
        present: u64,
        /// Bytes the record needs (header included; 16 when the header itself is cut).
        expected: u64,
    },
}

/// One captured frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Capture time, nanoseconds since the epoch.
    pub ts_ns: u64,
    /// Bytes on the wire (may exceed what was captured).
    pub orig_len: u32,
    /// The captured bytes.
    pub data: Vec<u8>,
}

/// Reads a classic pcap stream record by record.
#[derive(Debug)]
pub struct Reader<R: Read> {
    r: R,
    swapped: bool,
    nanos: bool,
    index: u64,
    offset: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the global header.
    pub fn new(mut r: R) -> Result<Self, PcapError> {
        let mut h = [0u8; 24];
        r.read_exact(&mut h).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => PcapError::BadMagic(0),
            _ => PcapError::Io(e),
        })?;
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let (swapped, nanos) = match magic {
            0xa1b2_c3d4 => (false, false),
            0xa1b2_3c4d => (false, true),
            0xd4c3_b2a1 => (true, false),
            0x4d3c_b2a1 => (true, true),
            0x0a0d_0d0a => return Err(PcapError::Pcapng),
            m => return Err(PcapError::BadMagic(m)),
        };
        let rd = |b: &[u8]| {
            let v = [b[0], b[1], b[2], b[3]];
            if swapped {
                u32::from_be_bytes(v)
            } else {
                u32::from_le_bytes(v)
            }
        };
        let link = rd(&h[20..24]) & 0x0fff_ffff;
        if link != LINKTYPE_ETHERNET {
            return Err(PcapError::LinkType(link));
        }
        Ok(Reader {
            r,
            swapped,
            nanos,
            index: 0,
            offset: h.len() as u64,
            ended: false,
        })
    }

    fn u32(&self, b: &[u8]) -> u32 {
        let v = [b[0], b[1], b[2], b[3]];
        if self.swapped {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        }
    }

    /// Records returned so far.
    pub fn records(&self) -> u64 {
        self.index
    }

    /// Bytes consumed so far (the global header and every record returned):
    /// the byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record, `None` at the end of the file (a new allocation
    /// per record; [`Reader::next_into`] reuses one).
    ///
    /// A file that ends inside a record gives [`PcapError::Truncated`] once,
    /// after every whole record before it; the reader then stays at its end
    /// (`None`).
    pub fn next_record(&mut self) -> Result<Option<Record>, PcapError> {
        let mut rec = Record::default();
        Ok(self.next_into(&mut rec)?.then_some(rec))
    }

    /// Reads the next record into `rec`, reusing its buffer (no allocation
    /// once it has grown to the largest record); false at the end of the
    /// file, `rec` then unchanged. Errors as [`Reader::next_record`]'s.
    pub fn next_into(&mut self, rec: &mut Record) -> Result<bool, PcapError> {
        if self.ended {
            return Ok(false);
        }
        let mut h = [0u8; 16];
        let got = fill(&mut self.r, &mut h)?;
        if got == 0 {
            self.ended = true;
            return Ok(false);
        }
        if got < h.len() {
            return Err(self.truncated(got, h.len()));
        }
        let (sec, frac, incl, orig) = (
            self.u32(&h[0..4]),
            self.u32(&h[4..8]),
            self.u32(&h[8..12]),
            self.u32(&h[12..16]),
        );
        if incl > MAX_RECORD {
            return Err(PcapError::RecordTooLarge {
                index: self.index,
                len: incl,
            });
        }
        rec.data.clear();
        rec.data.reserve_exact(incl as usize); // at most MAX_RECORD
                                               // Read straight into the buffer's spare room (no zero-filling
                                               // first; `read_to_end` retries interrupted reads itself).
        let got = (&mut self.r)
            .take(u64::from(incl))
            .read_to_end(&mut rec.data)?;
        if got < incl as usize {
            return Err(self.truncated(h.len() + got, h.len() + incl as usize));
        }
        self.index += 1;
        self.offset += (h.len() + got) as u64;
        rec.ts_ns =
            u64::from(sec) * 1_000_000_000 + u64::from(frac) * if self.nanos { 1 } else { 1000 };
        rec.orig_len = orig;
        Ok(true)
    }

    /// The end inside a record: reported once, then the reader is at its end.
    fn truncated(&mut self, present: usize, expected: usize) -> PcapError {
        self.ended = true;
        PcapError::Truncated {
            index: self.index,
            offset: self.offset,
            present: present as u64,
            expected: expected as u64,
        }
    }
}

/// Reads until `buf` is full or the stream ends; how many bytes it got.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, PcapError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Writes a classic pcap stream (little-endian, nanosecond timestamps).
#[derive(Debug)]
pub struct Writer<W: Write> {
    w: W,
}

impl<W: Write> Writer<W> {
    /// Writes the global header.
    pub fn new(mut w: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_3c4du32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&MAX_RECORD.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        w.write_all(&h)?;
        Ok(Writer { w })
    }

    /// Appends a frame.
    pub fn write(&mut self, ts_ns: u64, orig_len: u32, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&((ts_ns / 1_000_000_000) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&((ts_ns % 1_000_000_000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&orig_len.max(data.len() as u32).to_le_bytes());
        self.w.write_all(&h)?;
        self.w.write_all(data)
    }

    /// Flushes what was written so far.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// Flushes and returns the inner writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// `next_into` reads what `next_record` reads, reusing one buffer (a
    /// shorter record after a longer one is not padded with the old bytes),
    /// and reports a cut record the same way.
    #[test]
    fn reading_into_one_record_reuses_its_buffer() {
        let mut w = Writer::new(Vec::new()).expect("writer");
        w.write(7, 1514, &[9; 100]).expect("write");
        w.write(8, 60, &[1, 2, 3]).expect("write");
        let bytes = w.into_inner().expect("flush");
        let mut r = Reader::new(&bytes[..]).expect("reader");
        let mut rec = Record::default();
        assert!(r.next_into(&mut rec).expect("first"));
        assert_eq!((rec.ts_ns, rec.orig_len, rec.data.len()), (7, 1514, 100));
        let room = rec.data.capacity();
        assert!(r.next_into(&mut rec).expect("second"));
        assert_eq!(
            rec,
            Record {
                ts_ns: 8,
                orig_len: 60,
                data: vec![1, 2, 3]
            }
        );
        assert_eq!(rec.data.capacity(), room, "the buffer is reused");
        assert!(!r.next_into(&mut rec).expect("end"));
        assert_eq!(rec.data, [1, 2, 3], "unchanged at the end");
        let mut cut = Reader::new(&bytes[..bytes.len() - 1]).expect("reader");
        assert!(cut.next_into(&mut rec).expect("first is whole"));
        assert!(matches!(
            cut.next_into(&mut rec),
            Err(PcapError::Truncated {
                index: 1,
                present: 18,
                expected: 19,
                ..
            })
        ));
        assert!(!cut.next_into(&mut rec).expect("at the end"));
    }

    #[test]
    fn round_trip_and_errors() {
        let mut w = Writer::new(Vec::new()).expect("writer");
        w.write(1_500_000_123, 60, &[1, 2, 3]).expect("write");
        w.write(2_000_000_000, 1514, &[9; 64]).expect("write");
        let bytes = w.into_inner().expect("flush");
        let mut r = Reader::new(&bytes[..]).expect("reader");
        let a = r.next_record().expect("ok").expect("record");
        assert_eq!(
            (a.ts_ns, a.orig_len, a.data),
            (1_500_000_123, 60, vec![1, 2, 3])
        );
        let b = r.next_record().expect("ok").expect("record");
        assert_eq!(
            (b.ts_ns, b.orig_len, b.data.len()),
            (2_000_000_000, 1514, 64)
        );
        assert!(r.next_record().expect("ok").is_none());
        let mut cut = Reader::new(&bytes[..bytes.len() - 1]).expect("reader");
        cut.next_record().expect("first is whole");
        assert!(matches!(
            cut.next_record(),
            Err(PcapError::Truncated {
                index: 1,
                offset: 43,
                present: 79,
                expected: 80
            })
        ));
        assert!(cut.next_record().expect("at the end").is_none());
        // Cut inside the second record's header.
        let mut cut = Reader::new(&bytes[..24 + 19 + 10]).expect("reader");
        cut.next_record().expect("first is whole");
        assert_eq!(cut.offset(), 43);
        let e = cut.next_record().expect_err("cut header");
        assert!(matches!(
            e,
            PcapError::Truncated {
                index: 1,
                offset: 43,
                present: 10,
                expected: 16
            }
        ));
        assert!(e.to_string().contains("byte offset 43"), "{e}");
        assert!(matches!(
            Reader::new(
                &[
                    0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0
                ][..]
            ),
            Err(PcapError::Pcapng)
        ));
        assert!(matches!(
            Reader::new(&[0u8; 10][..]),
            Err(PcapError::BadMagic(0))
        ));
        // A big-endian, microsecond file with a Linux cooked link type is refused by link type.
        let mut be = vec![0xa1, 0xb2, 0xc3, 0xd4, 0, 2, 0, 4];
        be.extend_from_slice(&[0; 12]);
        be.extend_from_slice(&113u32.to_be_bytes());
        assert!(matches!(
            Reader::new(&be[..]),
            Err(PcapError::LinkType(113))
        ));
        // A record claiming a huge length is refused before allocating.
        let mut huge = bytes[..24].to_vec();
        huge.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
        assert!(matches!(
            Reader::new(&huge[..]).expect("reader").next_record(),
            Err(PcapError::RecordTooLarge { .. })
        ));
    }
}
