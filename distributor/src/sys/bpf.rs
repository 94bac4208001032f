//! `bpf(2)`, soundly: maps that know their key and value sizes (a read or write with a buffer of another size is refused, never passed to the kernel), programs, XDP links and test runs, each owning its descriptor.
//!
//! Every attribute block is built here from typed arguments; the pointers
//! it carries come from slices borrowed for the call, at the lengths the
//! kernel is told, so no safe caller can make the kernel read or write
//! memory it does not own.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `struct bpf_prog_info`: the bytes we read of it, and where its
/// `run_time_ns` and `run_cnt` sit.
const PROG_INFO_LEN: usize = 224;
const PROG_INFO_RUN_TIME: usize = 192;
const PROG_INFO_RUN_CNT: usize = 200;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register (low 4 bits), source register (high 4 bits).
    pub regs: u8,
    /// Offset.
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

/// The kinds of map used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_ARRAY`.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`: a value per possible CPU.
    PerCpuArray,
    /// `BPF_MAP_TYPE_XSKMAP`: XDP sockets by queue.
    XskMap,
}

impl MapKind {
    fn code(self) -> u32 {
        match self {
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::XskMap => 17,
        }
    }
}

/// A map, its descriptor owned, its sizes known.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: u32,
    /// Bytes of one value as user space reads and writes it (per-CPU maps:
    /// the value rounded up to 8, times the possible CPUs).
    user_value: usize,
}

/// `bpf(2)` on an attribute block of 128 bytes (zero beyond what is set).
///
/// # Safety
/// Every pointer in `attr` must name memory live for the call, readable
/// (and writable where the command writes) for the length the block gives
/// the kernel for it.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i32> {
    // SAFETY: `attr` is a live, 8-byte aligned block of the size passed;
    // the pointers in it are the caller's promise.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<[u64; 16]>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

/// A descriptor the kernel has just returned: owned from here on.
///
/// # Safety
/// `fd` was returned by a successful bpf(2) call that creates a
/// descriptor, and nothing else owns or closes it.
unsafe fn own(fd: i32) -> OwnedFd {
    // SAFETY: the caller's promise: a fresh descriptor no one else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Writes `name` (at most 15 bytes, NUL-padded to 16) at byte offset `at`
/// of an attribute block.
fn put_name(attr: &mut [u64; 16], at: usize, name: &str) {
    let mut bytes = [0u8; 128];
    for (i, w) in attr.iter().enumerate() {
        bytes[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    let name = name.as_bytes();
    let len = name.len().min(15);
    bytes[at..at + 16].fill(0);
    bytes[at..at + len].copy_from_slice(&name[..len]);
    for (i, w) in attr.iter_mut().enumerate() {
        let mut x = [0u8; 8];
        x.copy_from_slice(&bytes[8 * i..8 * i + 8]);
        *w = u64::from_le_bytes(x);
    }
}

/// CPUs the kernel may run (a per-CPU map holds a value for each).
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "cpu/possible unreadable");
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        n = n.max(b + 1).max(a + 1);
    }
    Ok(n)
}

fn wrong_size(what: &str, got: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}: {got} bytes for a map of {want}"),
    )
}

impl Map {
    /// Creates a map of `entries` entries with 4-byte keys and
    /// `value_size`-byte values, named `name` (15 bytes shown).
    pub fn create(kind: MapKind, value_size: u32, entries: u32, name: &str) -> io::Result<Map> {
        let key_size = 4u32;
        let user_value = match kind {
            MapKind::PerCpuArray => (value_size as usize).div_ceil(8) * 8 * possible_cpus()?,
            _ => value_size as usize,
        };
        let mut attr = [0u64; 16];
        attr[0] = u64::from(kind.code()) | (u64::from(key_size) << 32);
        attr[1] = u64::from(value_size) | (u64::from(entries) << 32);
        // map_name: 16 bytes at offset 28 (after map_flags, inner_map_fd, numa_node).
        put_name(&mut attr, 28, name);
        // SAFETY: the block carries no pointer.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
        Ok(Map {
            // SAFETY: a descriptor BPF_MAP_CREATE just returned.
            fd: unsafe { own(fd) },
            key_size,
            user_value,
        })
    }

    /// The descriptor, for a program's `ld_imm64` of this map.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Bytes of a value as [`Map::update`] and [`Map::lookup`] take it.
    pub fn value_len(&self) -> usize {
        self.user_value
    }

    /// Sets entry `key` to `value` (exactly [`Map::value_len`] bytes).
    pub fn update(&self, key: u32, value: &[u8]) -> io::Result<()> {
        debug_assert_eq!(self.key_size, 4);
        if value.len() != self.user_value {
            return Err(wrong_size("map update", value.len(), self.user_value));
        }
        let mut attr = [0u64; 16];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = value.as_ptr() as u64;
        // SAFETY: the key is 4 live bytes (the map's key size) and the
        // value `user_value` live bytes (what the kernel reads), for the call.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(|_| ())
    }

    /// Reads entry `key` into `value` (exactly [`Map::value_len`] bytes).
    pub fn lookup(&self, key: u32, value: &mut [u8]) -> io::Result<()> {
        if value.len() != self.user_value {
            return Err(wrong_size("map lookup", value.len(), self.user_value));
        }
        let mut attr = [0u64; 16];
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = value.as_mut_ptr() as u64;
        // SAFETY: the key is 4 live bytes; the value `user_value` live,
        // writable bytes — what the kernel writes for this map.
        unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }.map(|_| ())
    }
}

/// A BPF ring buffer map (`BPF_MAP_TYPE_RINGBUF`): programs reserve and
/// submit records into it; [`RingBuf::drain`] reads them on this side. The
/// protocol is the kernel's (`kernel/bpf/ringbuf.c`, libbpf's `ringbuf.c`):
/// a consumer page this side writes (the consumer position), a read-only
/// producer page (the producer position), then the data area mapped twice
/// in a row, so a record that wraps reads as one range. Each record is an
/// 8-byte header — its length, with a busy bit while the program still
/// writes it and a discard bit — then its bytes, rounded up to 8.
#[derive(Debug)]
pub struct RingBuf {
    map: Map,
    consumer: super::mmap::Mmap,
    producer: super::mmap::Mmap,
    page: usize,
    mask: u64,
}

const BPF_MAP_TYPE_RINGBUF: u64 = 27;
const RINGBUF_BUSY: u32 = 1 << 31;
const RINGBUF_DISCARD: u32 = 1 << 30;
const RINGBUF_HEADER: usize = 8;

impl RingBuf {
    /// A ring buffer of `bytes` of data (a power of two, at least a page).
    pub fn create(bytes: u32, name: &str) -> io::Result<RingBuf> {
        let page = page_size();
        if !bytes.is_power_of_two() || (bytes as usize) < page {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a ring buffer of {bytes} bytes: a power of two of at least {page}"),
            ));
        }
        let mut attr = [0u64; 16];
        attr[0] = BPF_MAP_TYPE_RINGBUF; // key and value sizes 0
        attr[1] = u64::from(bytes) << 32; // max_entries: the data bytes
        put_name(&mut attr, 28, name);
        // SAFETY: the block carries no pointer.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }?;
        let map = Map {
            // SAFETY: a descriptor BPF_MAP_CREATE just returned.
            fd: unsafe { own(fd) },
            key_size: 0,
            user_value: 0,
        };
        use std::os::fd::AsFd;
        let consumer =
            super::mmap::Mmap::shared(map.fd.as_fd(), page, 0, super::mmap::Extra::None)?;
        let producer = super::mmap::Mmap::shared_read_only(
            map.fd.as_fd(),
            page + 2 * bytes as usize,
            page as u64,
        )?;
        Ok(RingBuf {
            map,
            consumer,
            producer,
            page,
            mask: u64::from(bytes) - 1,
        })
    }

    /// The descriptor, for a program's `ld_imm64` of this map.
    pub fn raw(&self) -> RawFd {
        self.map.raw()
    }

    /// Hands every committed record, oldest first, to `f` (at most `max`)
    /// and frees their room; returns how many. Of each record only its
    /// first `head` bytes are read, then as many as `want` says from them
    /// (a record reserved larger than what was written into it is not read
    /// past that: reading bytes the producer did not write would pull
    /// lines it writes next time round away from its core); never more
    /// than the record or `buf`. Stops at a record still being written.
    pub fn drain(
        &mut self,
        buf: &mut [u8],
        max: usize,
        head: usize,
        want: impl Fn(&[u8]) -> usize,
        mut f: impl FnMut(&[u8], usize),
    ) -> usize {
        use std::sync::atomic::Ordering;
        let (Some(cons), Some(prod)) = (self.consumer.atomic_u64(0), self.producer.atomic_u64(0))
        else {
            return 0;
        };
        let mut at = cons.load(Ordering::Acquire);
        let mut n = 0;
        // The producer's position once, the consumer's written once: each
        // store would pull the line the kernel's reserve reads away from
        // the steering core (the ring is big enough to free space late).
        let end = prod.load(Ordering::Acquire);
        while n < max {
            if at >= end {
                break;
            }
            let off = self.page + (at & self.mask) as usize;
            let Some(word) = self.producer.atomic_u32(off) else {
                break;
            };
            let header = word.load(Ordering::Acquire);
            if header & RINGBUF_BUSY != 0 {
                break;
            }
            let len = (header & !(RINGBUF_BUSY | RINGBUF_DISCARD)) as usize;
            if header & RINGBUF_DISCARD == 0 {
                let first = head.min(len).min(buf.len());
                let start = off + RINGBUF_HEADER;
                if self.producer.copy_out(start, &mut buf[..first]) {
                    let take = want(&buf[..first]).max(first).min(len).min(buf.len());
                    if self.producer.copy_out(start + first, &mut buf[first..take]) {
                        f(&buf[..take], len);
                        n += 1;
                    }
                }
            }
            at += (RINGBUF_HEADER + len).div_ceil(8) as u64 * 8;
        }
        cons.store(at, Ordering::Release);
        n
    }
}

/// Now on the clock of `bpf_ktime_get_ns` (CLOCK_MONOTONIC), in ns: to
/// place a ring record's time on the wall clock.
pub fn ktime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant; no memory is passed.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// A loaded XDP program, its descriptor owned.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

/// What a test run of a program did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (the XDP action).
    pub retval: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
}

/// The kernel's run-time statistics of every BPF program
/// (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`), on while this is held: each
/// run then costs two clock reads, so for measurements only.
#[derive(Debug)]
pub struct RunStats {
    _fd: OwnedFd,
}

impl RunStats {
    /// Switches the statistics on (root; until dropped).
    pub fn enable() -> io::Result<RunStats> {
        let mut attr = [0u64; 16];
        // enable_stats.type = BPF_STATS_RUN_TIME (0)
        // SAFETY: the block carries no pointer.
        let fd = unsafe { bpf(BPF_ENABLE_STATS, &mut attr) }?;
        // SAFETY: a descriptor BPF_ENABLE_STATS just returned.
        Ok(RunStats {
            _fd: unsafe { own(fd) },
        })
    }
}

impl Program {
    /// The kernel's (nanoseconds spent, runs) of this program so far:
    /// counted while [`RunStats`] are on.
    pub fn run_stats(&self) -> io::Result<(u64, u64)> {
        let mut info = [0u8; PROG_INFO_LEN];
        let mut attr = [0u64; 16];
        // info.bpf_fd | info.info_len, info.info
        attr[0] = self.fd.as_raw_fd() as u64 | ((PROG_INFO_LEN as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        // SAFETY: `info` is PROG_INFO_LEN live writable bytes, the length
        // the block gives; zeroed, it asks for none of the arrays the
        // structure can point to.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&info[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        Ok((u64_at(PROG_INFO_RUN_TIME), u64_at(PROG_INFO_RUN_CNT)))
    }

    /// Loads an XDP program named `name` (15 bytes shown); the verifier's
    /// last lines are in the error when it refuses. The maps the program's
    /// instructions name must outlive the load (the kernel takes references).
    pub fn load_xdp(insns: &[Insn], name: &str) -> io::Result<Program> {
        let license: &CStr = c"Dual BSD/GPL";
        let load = |log: &mut [u8]| {
            let mut attr = [0u64; 16];
            attr[0] = u64::from(BPF_PROG_TYPE_XDP) | ((insns.len() as u64) << 32);
            attr[1] = insns.as_ptr() as u64;
            attr[2] = license.as_ptr() as u64;
            if !log.is_empty() {
                attr[3] = 1 | ((log.len() as u64) << 32);
                attr[4] = log.as_mut_ptr() as u64;
            }
            // prog_name (offset 48, 16 bytes): what `ip link` and bpftool show.
            put_name(&mut attr, 48, name);
            // expected_attach_type at offset 68.
            attr[8] = u64::from(BPF_XDP) << 32;
            // SAFETY: `insns` is `insns.len()` live instructions (8 bytes
            // each, `#[repr(C)]` as `struct bpf_insn`), the license a live
            // NUL-terminated string, the log (when given) live and writable
            // for the length given.
            unsafe { bpf(BPF_PROG_LOAD, &mut attr) }
        };
        match load(&mut []) {
            // SAFETY: a descriptor BPF_PROG_LOAD just returned.
            Ok(fd) => Ok(Program {
                fd: unsafe { own(fd) },
            }),
            Err(e) => {
                let mut log = vec![0u8; 64 * 1024];
                let _ = load(&mut log);
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.trim().lines().rev().take(6).collect();
                let why: Vec<&str> = tail.into_iter().rev().collect();
                Err(io::Error::new(
                    e.kind(),
                    format!("{e} ({})", why.join(" / ")),
                ))
            }
        }
    }

    /// Runs the program once on `frame`, the kernel reporting what it
    /// returned and the frame as it left (redirects not carried out).
    pub fn test_run(&self, frame: &[u8]) -> io::Result<TestRun> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = [0u64; 16];
        // prog_fd, retval | data_size_in, data_size_out
        attr[0] = self.fd.as_raw_fd() as u64;
        attr[1] = (frame.len() as u64) | ((out.len() as u64) << 32);
        attr[2] = frame.as_ptr() as u64;
        attr[3] = out.as_mut_ptr() as u64;
        // repeat
        attr[4] = 1;
        // SAFETY: the input is `frame.len()` live bytes, the output buffer
        // `out.len()` live writable bytes, the sizes the block gives.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
        let retval = (attr[0] >> 32) as u32;
        let out_len = ((attr[1] >> 32) as usize).min(out.len());
        out.truncate(out_len);
        Ok(TestRun { retval, out })
    }
}

/// An XDP program attached to an interface by a BPF link: detached when
/// dropped (or when the process ends).
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

/// `XDP_FLAGS_SKB_MODE`: the generic path.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: in the driver.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

impl Link {
    /// Attaches `prog` to interface `ifindex` with XDP `flags`.
    pub fn xdp(prog: &Program, ifindex: u32, flags: u32) -> io::Result<Link> {
        let mut attr = [0u64; 16];
        attr[0] = prog.fd.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
        attr[1] = u64::from(BPF_XDP) | (u64::from(flags) << 32);
        // SAFETY: the block carries no pointer.
        let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
        // SAFETY: a descriptor BPF_LINK_CREATE just returned.
        Ok(Link {
            fd: unsafe { own(fd) },
        })
    }

    /// Replaces the link's program by `prog`, atomically: every frame runs
    /// one or the other.
    pub fn update(&self, prog: &Program) -> io::Result<()> {
        let mut attr = [0u64; 16];
        // link_fd, new_prog_fd | flags (0), old_prog_fd (unused)
        attr[0] = self.fd.as_raw_fd() as u64 | ((prog.fd.as_raw_fd() as u64) << 32);
        // SAFETY: the block carries no pointer.
        unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }?;
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn names_are_cut_and_padded() {
        let mut attr = [u64::MAX; 16];
        put_name(&mut attr, 48, "a_name_longer_than_fifteen");
        let bytes: Vec<u8> = attr.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&bytes[48..63], b"a_name_longer_t");
        assert_eq!(bytes[63], 0);
        assert_eq!(bytes[47], 0xff);
        assert_eq!(bytes[64], 0xff);
    }
}
