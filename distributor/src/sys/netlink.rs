//! Generic netlink, as far as the I/O layer needs it: one request, one answer, on an owned `NETLINK_GENERIC` socket; [`xdp_features`] asks the `netdev` family which XDP actions an interface supports.
//!
//! Messages are built and parsed here as bytes (every length checked
//! against the buffer), sent and received through `sys::socket`'s slice
//! calls: no pointer is handed to the kernel but a borrowed buffer's.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::socket::{self, RcvTimeout};

/// `NETDEV_XDP_ACT_NDO_XMIT`: the interface takes frames redirected to it by
/// XDP programs.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

/// A generic netlink socket (receive timeout one second).
#[derive(Debug)]
struct Genl {
    fd: OwnedFd,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

impl Genl {
    fn open() -> io::Result<Genl> {
        let fd = socket::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_GENERIC,
        )?;
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        socket::set(fd.as_fd(), RcvTimeout, tv)?;
        Ok(Genl { fd })
    }

    /// One request, one answer: generic netlink header (cmd, version) and
    /// one attribute.
    fn ask(&self, family: u16, cmd: u8, attr_type: u16, value: &[u8]) -> io::Result<Vec<u8>> {
        socket::send(self.fd.as_fd(), &request(family, cmd, attr_type, value))?;
        let mut buf = vec![0u8; 8192];
        let got = socket::recv(self.fd.as_fd(), &mut buf)?;
        buf.truncate(got);
        if buf.len() >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
            let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            return Err(io::Error::from_raw_os_error(-code));
        }
        Ok(buf)
    }
}

/// A request message: netlink header, generic netlink header, one attribute.
fn request(family: u16, cmd: u8, attr_type: u16, value: &[u8]) -> Vec<u8> {
    let alen = 4 + value.len();
    let mut m = Vec::with_capacity(32 + value.len());
    let total = 16 + 4 + alen.div_ceil(4) * 4;
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(&(alen as u16).to_ne_bytes());
    m.extend_from_slice(&attr_type.to_ne_bytes());
    m.extend_from_slice(value);
    m.resize(total, 0);
    m
}

/// Attribute `want` of an answer (after its 16 + 4 header bytes).
fn find(msg: &[u8], want: u16) -> Option<Vec<u8>> {
    let mut i = 20;
    while i + 4 <= msg.len() {
        let len = usize::from(u16::from_ne_bytes([msg[i], msg[i + 1]]));
        let ty = u16::from_ne_bytes([msg[i + 2], msg[i + 3]]) & 0x3fff;
        if len < 4 || i + len > msg.len() {
            return None;
        }
        if ty == want {
            return Some(msg[i + 4..i + len].to_vec());
        }
        i += len.div_ceil(4) * 4;
    }
    None
}

/// The XDP features the kernel reports for `ifindex` (the generic netlink
/// family `netdev`, Linux 6.3 and later): which XDP actions it supports,
/// `NETDEV_XDP_ACT_*` bits. A veth pair reports `NDO_XMIT` only while its
/// peer can receive redirected frames (an XDP program or GRO on the peer).
pub fn xdp_features(ifindex: u32) -> io::Result<u64> {
    let sock = Genl::open()?;
    // CTRL_CMD_GETFAMILY (3) by CTRL_ATTR_FAMILY_NAME (2) → CTRL_ATTR_FAMILY_ID (1).
    let fam = sock.ask(libc::GENL_ID_CTRL as u16, 3, 2, b"netdev\0")?;
    let id = find(&fam, 1)
        .filter(|v| v.len() >= 2)
        .ok_or_else(|| bad("no netdev family"))?;
    let family = u16::from_ne_bytes([id[0], id[1]]);
    // NETDEV_CMD_DEV_GET (1) by NETDEV_A_DEV_IFINDEX (1) → NETDEV_A_DEV_XDP_FEATURES (3).
    let dev = sock.ask(family, 1, 1, &ifindex.to_ne_bytes())?;
    let f = find(&dev, 3)
        .filter(|v| v.len() >= 8)
        .ok_or_else(|| bad("no xdp-features"))?;
    Ok(u64::from_ne_bytes([
        f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
    ]))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn requests_are_padded_and_attributes_found() {
        let m = request(0x10, 3, 2, b"netdev\0");
        assert_eq!(m.len(), 16 + 4 + 12);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        // An answer with the same layout: attribute 2 found, 1 not.
        assert_eq!(find(&m, 2).as_deref(), Some(&b"netdev\0"[..]));
        assert_eq!(find(&m, 1), None);
        // A truncated attribute is not read past the buffer.
        assert_eq!(find(&m[..m.len() - 4], 2), None);
    }
}
