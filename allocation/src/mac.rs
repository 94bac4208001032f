//! Ethernet MAC addresses: parsing, printing, and deriving a TM's MAC from a base.

use std::fmt;
use std::str::FromStr;

use crate::error::ParseError;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC `offset` positions after `self`, treating the address as a
    /// 48-bit number (wrapping): how `stdctl table new --mac-base` numbers TMs.
    pub fn offset(self, offset: u64) -> MacAddr {
        let mut wide = [0u8; 8];
        wide[2..].copy_from_slice(&self.0);
        let v = u64::from_be_bytes(wide).wrapping_add(offset) & 0xffff_ffff_ffff;
        let mut out = [0u8; 6];
        out.copy_from_slice(&v.to_be_bytes()[2..]);
        MacAddr(out)
    }

    /// True for group (multicast/broadcast) addresses.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;

    /// Parses `aa:bb:cc:dd:ee:ff` (or with `-` separators).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ParseError::new(
                "MAC address",
                s,
                "expected six hex octets like 02:00:00:00:00:01",
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parse_print_offset() {
        let m: MacAddr = "02:53:54:00:00:ff".parse().expect("mac");
        assert_eq!(m.to_string(), "02:53:54:00:00:ff");
        assert_eq!(m.offset(1).to_string(), "02:53:54:00:01:00");
        assert_eq!("02-53-54-00-00-FF".parse::<MacAddr>().expect("mac"), m);
        assert!(!m.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .expect("mac")
            .is_multicast());
        for bad in [
            "",
            "02:53:54:00:00",
            "02:53:54:00:00:00:00",
            "0g:00:00:00:00:00",
            "002:0:0:0:0:0",
            "::::::",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
