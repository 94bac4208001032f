//! Sockets, soundly: creation returning an [`OwnedFd`], typed socket options (each option's value type fixed), binding to an interface, interface indexes, `poll` sets, the `sendto`/`recvfrom` wake-ups of the ring sockets, plain `send`/`recv`, and `sendmmsg` batches built from a staging area this module owns.
//!
//! The options that would let the kernel read or write caller memory
//! (rings, UMEM registration) are not among the typed ones: the ring
//! owners in `sys` set them where they map what they ask for.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A new socket of `domain`, `ty` and `protocol` (socket(2)), owned.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointer; the result is checked.
    let fd = unsafe { libc::socket(domain, ty, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw `AF_PACKET` socket for frames of `protocol` (host order), owned.
pub fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        libc::c_int::from(protocol.to_be()),
    )
}

/// A socket option whose value type is fixed: only the options defined
/// here, each with the type the kernel reads or writes for it.
pub trait SockOpt: private::Sealed {
    /// The option's value.
    type Value: Copy;
    /// `level` of setsockopt(2).
    const LEVEL: libc::c_int;
    /// `optname` of setsockopt(2).
    const NAME: libc::c_int;
}

/// An option [`set`] may set.
pub trait SetOpt: SockOpt {}

/// An option [`get`] may read: its value type is valid for every bit
/// pattern (the kernel may write fewer bytes than its size; the rest stay
/// zero).
pub trait GetOpt: SockOpt {
    /// The value before the kernel writes it.
    fn zero() -> Self::Value;
}

mod private {
    pub trait Sealed {}
}

macro_rules! opt {
    ($(#[$doc:meta])* $name:ident: $ty:ty = $level:expr, $opt:expr; $($kind:ident),+) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl private::Sealed for $name {}
        impl SockOpt for $name {
            type Value = $ty;
            const LEVEL: libc::c_int = $level;
            const NAME: libc::c_int = $opt;
        }
        $(opt!(@ $kind $name);)+
    };
    (@ set $name:ident) => {
        impl SetOpt for $name {}
    };
    (@ get $name:ident) => {
        impl GetOpt for $name {
            fn zero() -> <$name as SockOpt>::Value {
                // SAFETY: the value type is a C struct of integers (or an
                // integer), for which all-zero is a valid value.
                unsafe { std::mem::zeroed() }
            }
        }
    };
}

/// `SOL_PACKET`.
pub const SOL_PACKET: libc::c_int = 263;

opt!(
    /// `PACKET_FANOUT`: group id | mode << 16.
    PacketFanout: u32 = SOL_PACKET, 18; set
);
opt!(
    /// `PACKET_QDISC_BYPASS`: frames straight to the driver (non-zero: on).
    PacketQdiscBypass: libc::c_int = SOL_PACKET, 20; set
);
opt!(
    /// `PACKET_IGNORE_OUTGOING`: the socket's own output is not received.
    PacketIgnoreOutgoing: libc::c_int = SOL_PACKET, 23; set
);
opt!(
    /// `PACKET_STATISTICS`: received and dropped frames since the last read.
    PacketStatistics: libc::tpacket_stats = SOL_PACKET, 6; get
);
opt!(
    /// `SO_RCVTIMEO`: how long a receive waits.
    RcvTimeout: libc::timeval = libc::SOL_SOCKET, libc::SO_RCVTIMEO; set
);
opt!(
    /// `SO_BUSY_POLL`: microseconds a receive busy-polls the queue.
    BusyPoll: u32 = libc::SOL_SOCKET, 46; set
);
opt!(
    /// `SO_PREFER_BUSY_POLL`: busy polling preferred to interrupts.
    PreferBusyPoll: u32 = libc::SOL_SOCKET, 69; set
);
opt!(
    /// `SO_BUSY_POLL_BUDGET`: frames one busy poll may take.
    BusyPollBudget: u32 = libc::SOL_SOCKET, 70; set
);
opt!(
    /// `XDP_STATISTICS`: an XDP socket's running drop counts.
    XdpStatistics: libc::xdp_statistics = libc::SOL_XDP, libc::XDP_STATISTICS; get
);
opt!(
    /// `XDP_MMAP_OFFSETS`: where an XDP socket's rings lie in their mappings.
    XdpMmapOffsets: libc::xdp_mmap_offsets = libc::SOL_XDP, libc::XDP_MMAP_OFFSETS; get
);

/// setsockopt(2) of option `name` at `level` to `value`.
///
/// # Safety
/// `T` must be the value type the kernel reads for that option, and
/// setting it must not make the kernel read or write memory the caller
/// does not own for as long as the kernel uses it (as a UMEM address does).
pub(super) unsafe fn setsockopt_raw<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed, which the
    // kernel only reads during the call; what the option does with it is
    // the caller's promise.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets option `O` of `fd` to `value`.
pub fn set<O: SetOpt>(fd: BorrowedFd<'_>, _opt: O, value: O::Value) -> io::Result<()> {
    // SAFETY: `O::Value` is the option's value type (fixed by the impl
    // above); none of the settable options carries an address.
    unsafe { setsockopt_raw(fd, O::LEVEL, O::NAME, &value) }
}

/// Reads option `O` of `fd`.
pub fn get<O: GetOpt>(fd: BorrowedFd<'_>, _opt: O) -> io::Result<O::Value> {
    let mut value = O::zero();
    let mut len = std::mem::size_of::<O::Value>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable `O::Value` of `len` bytes; the
    // kernel writes at most `len` bytes, and any bytes are a valid value.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            O::LEVEL,
            O::NAME,
            (&mut value as *mut O::Value).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// bind(2) of a socket to a socket address of type `T`.
///
/// # Safety
/// `T` must be the address type of the socket's family.
pub(super) unsafe fn bind_raw<T>(fd: BorrowedFd<'_>, addr: &T) -> io::Result<()> {
    // SAFETY: `addr` is a live `T` of the size passed, read during the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (addr as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds an `AF_PACKET` socket to interface `ifindex` for frames of
/// `protocol` (host order).
pub fn bind_packet(fd: BorrowedFd<'_>, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_ll is valid; we fill the fields bind reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll, the address type of AF_PACKET.
    unsafe { bind_raw(fd, &sll) }
}

/// The index of interface `name` (if_nametoindex(3)).
pub fn if_nametoindex(name: &CStr) -> io::Result<u32> {
    // SAFETY: `name` is a valid C string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// A `poll` set of descriptors waited on for input, built once.
#[derive(Debug)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    /// The set of `fds` (descriptor numbers: a closed one only makes poll
    /// report `POLLNVAL`).
    pub fn new(fds: impl Iterator<Item = RawFd>) -> PollSet {
        PollSet {
            fds: fds
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
        }
    }

    /// Waits up to `ms` milliseconds for any descriptor to be readable
    /// (one `poll`, no allocation); an interrupted wait is not an error.
    pub fn wait(&mut self, ms: i32) -> io::Result<()> {
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let r = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Asks the kernel to send what a socket's TX ring holds (one `sendto`
/// with no data); a full queue or a busy socket is not an error (the
/// frames stay queued).
pub fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: sendto with no buffer and no address: nothing is read.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

/// A `recvfrom` with no buffer, not waiting: on an XDP socket with the
/// busy-poll options, runs the queue's NAPI poll in this thread. What it
/// returns does not matter (the RX ring is the data).
pub fn poke_rx(fd: BorrowedFd<'_>) {
    // SAFETY: recvfrom with no buffer and no address: nothing is written.
    unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
}

/// send(2) of `buf`; the bytes sent.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live buffer of the length passed, only read.
    let r = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// recv(2) into `buf`; the bytes received.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of the length passed.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Frames staged for one `sendmmsg` batch: a staging area of `slots`
/// slots of `slot_size` bytes, and the message arrays (allocated once;
/// their pointers are refreshed at each send, always into the area).
#[derive(Debug)]
pub struct SendBatch {
    stage: Vec<u8>,
    lens: Vec<usize>,
    slots: usize,
    slot_size: usize,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iov` and `msgs` point into `stage` and
// `iov`, owned by this value (rebuilt before every use), so moving the
// value to another thread moves everything they point to; `&mut self`
// for every use.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Room for `slots` frames of up to `slot_size` bytes (a size past
    /// memory is a programming error: it panics).
    pub fn new(slots: usize, slot_size: usize) -> SendBatch {
        let bytes = slots
            .checked_mul(slot_size)
            .expect("SendBatch: slots × slot_size overflows");
        SendBatch {
            stage: vec![0u8; bytes],
            lens: Vec::with_capacity(slots),
            slots,
            slot_size,
            iov: Vec::with_capacity(slots),
            msgs: Vec::with_capacity(slots),
        }
    }

    /// True if every slot holds a frame.
    pub fn is_full(&self) -> bool {
        self.lens.len() >= self.slots
    }

    /// Copies `frame` into the next slot; false if the batch is full or
    /// the frame longer than a slot (nothing staged).
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.is_full() || frame.len() > self.slot_size {
            return false;
        }
        let at = self.lens.len() * self.slot_size;
        self.stage[at..at + frame.len()].copy_from_slice(frame);
        self.lens.push(frame.len());
        true
    }

    /// Sends the staged frames on `fd` (bound to its interface: no
    /// address) with `sendmmsg`, as many calls as it takes, and empties
    /// the batch whatever happened.
    pub fn send(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let n = self.lens.len();
        self.iov.clear();
        self.msgs.clear();
        let base = self.stage.as_mut_ptr();
        for (i, &len) in self.lens.iter().enumerate() {
            self.iov.push(libc::iovec {
                // SAFETY: i < lens.len() ≤ slots (push refuses more), so
                // i × slot_size + len ≤ slots × slot_size = stage.len()
                // (no overflow: checked in `new`); `len` ≤ slot_size.
                iov_base: unsafe { base.add(i * self.slot_size) }.cast(),
                iov_len: len,
            });
        }
        for i in 0..n {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            // SAFETY: msgs[done..n] are live, writable mmsghdr (the kernel
            // writes each one's msg_len) whose iovecs point into `stage`
            // (slot lengths within it), all outliving the call; the kernel
            // only reads the iovecs and the frames.
            let r = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.msgs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                result = Err(io::Error::last_os_error());
                break;
            }
            done += r as usize;
        }
        self.lens.clear();
        result
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_send_batch_refuses_what_does_not_fit() {
        let mut b = SendBatch::new(2, 4);
        assert!(!b.push(b"12345"));
        assert!(b.push(b"1234"));
        assert!(b.push(b"12"));
        assert!(b.is_full());
        assert!(!b.push(b"1"));
    }

    #[test]
    fn unknown_interfaces_are_errors() {
        assert!(if_nametoindex(c"stdx-no-such0").is_err());
    }
}
