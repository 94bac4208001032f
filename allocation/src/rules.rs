//! Group rules: which traffic a TM group's table applies to, matched the same way in both directions.
//!
//! A rule matches a flow when every criterion it sets matches. Criteria are
//! *direction-free*: a port range matches when either port is in it, a prefix
//! when either address is in it. A packet and its reply therefore always
//! select the same group, which is what keeps both directions on one TM.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ParseError;
use crate::hash::{canonical, mask_addr};

/// IP protocol numbers the rules and flows name.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;

    /// Parses `tcp`, `udp`, `icmp`, `icmpv6` or a number 0–255.
    pub fn parse(s: &str) -> Option<u8> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(TCP),
            "udp" => Some(UDP),
            "icmp" => Some(ICMP),
            "icmpv6" | "ipv6-icmp" => Some(ICMPV6),
            n => n.parse().ok(),
        }
    }

    /// The protocol's name, or its number.
    pub fn name(p: u8) -> String {
        match p {
            TCP => "tcp".into(),
            UDP => "udp".into(),
            ICMP => "icmp".into(),
            ICMPV6 => "icmpv6".into(),
            n => n.to_string(),
        }
    }
}

/// An inclusive port range, written `80` or `8000-8999`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// Every port, 0–65535.
    pub const ALL: PortRange = PortRange { lo: 0, hi: 65535 };

    /// True if `port` is in the range.
    #[inline]
    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    /// How many ports the range holds.
    pub fn len(self) -> u32 {
        u32::from(self.hi) - u32::from(self.lo) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl fmt::Debug for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PortRange {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.trim().parse::<u16>().map_err(|_| {
                ParseError::new("port range", s, "expected PORT or LO-HI with ports 0-65535")
            })
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(ParseError::new(
                "port range",
                s,
                "the first port is above the last",
            ));
        }
        Ok(PortRange { lo, hi })
    }
}

impl TryFrom<String> for PortRange {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

/// An IP prefix, written `192.0.2.0/24` or `2001:db8::/32`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    /// Network address (host bits zero, canonical form).
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

impl Prefix {
    /// True if `addr` (in canonical form) is inside the prefix.
    #[inline]
    pub fn contains(self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        if addr.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        mask_addr(addr, self.len, self.len) == self.addr
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Prefix {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ParseError::new("prefix", s, why.to_string());
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/LENGTH"))?;
        let addr = canonical(a.parse::<IpAddr>().map_err(|_| bad("not an IP address"))?);
        let len: u8 = l.parse().map_err(|_| bad("bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad("prefix length too long for the address family"));
        }
        if mask_addr(addr, len, len) != addr {
            return Err(bad("host bits are set"));
        }
        Ok(Prefix { addr, len })
    }
}

impl TryFrom<String> for Prefix {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

/// An IP protocol in rules: a name or a number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Protocol(pub u8);

impl TryFrom<String> for Protocol {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        proto::parse(&s).map(Protocol).ok_or_else(|| {
            ParseError::new("protocol", &s, "expected tcp, udp, icmp, icmpv6 or 0-255")
        })
    }
}

impl From<Protocol> for String {
    fn from(p: Protocol) -> String {
        proto::name(p.0)
    }
}

impl fmt::Debug for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&proto::name(self.0))
    }
}

/// One match rule of a group. Unset criteria match anything; a rule with no
/// criterion at all is rejected when the table is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// IP protocol the flow must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Either port of the flow must be in this range (flows without ports never match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// Either address of the flow must be in this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<Prefix>,
}

/// How a rule matches the replies of one server-side connection — (server
/// address, server port) → (SNAT address, port), one protocol — as the
/// SNAT port varies: the only part of the reply a TM chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMatch {
    /// Whatever the port.
    Always,
    /// Only when the port is in this range.
    Ports(PortRange),
    /// Whatever the port, never.
    Never,
}

impl Rule {
    /// How the rule matches the replies from `server`:`server_port` to
    /// `snat`:port carrying `protocol`, as the port varies.
    pub fn reply_match(
        &self,
        protocol: u8,
        server: IpAddr,
        server_port: u16,
        snat: IpAddr,
    ) -> ReplyMatch {
        if self.protocol.is_some_and(|p| p.0 != protocol) {
            return ReplyMatch::Never;
        }
        if self
            .prefix
            .is_some_and(|p| !p.contains(server) && !p.contains(snat))
        {
            return ReplyMatch::Never;
        }
        match self.ports {
            Some(r) if !r.contains(server_port) => ReplyMatch::Ports(r),
            _ => ReplyMatch::Always,
        }
    }

    /// True if the rule sets no criterion.
    pub fn is_empty(&self) -> bool {
        self.protocol.is_none() && self.ports.is_none() && self.prefix.is_none()
    }

    /// True if the flow matches every criterion the rule sets.
    #[inline]
    pub fn matches(&self, flow: &crate::table::Flow) -> bool {
        if let Some(p) = self.protocol {
            if p.0 != flow.protocol {
                return false;
            }
        }
        if let Some(r) = self.ports {
            match flow.ports {
                Some((s, d)) if r.contains(s) || r.contains(d) => {}
                _ => return false,
            }
        }
        if let Some(p) = self.prefix {
            if !p.contains(flow.src) && !p.contains(flow.dst) {
                return false;
            }
        }
        true
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(p) = self.protocol {
            parts.push(proto::name(p.0));
        }
        if let Some(r) = self.ports {
            parts.push(format!("port {r}"));
        }
        if let Some(p) = self.prefix {
            parts.push(format!("net {p}"));
        }
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::table::Flow;

    fn flow(p: u8, s: &str, sp: u16, d: &str, dp: u16) -> Flow {
        Flow::with_ports(
            p,
            s.parse().expect("addr"),
            sp,
            d.parse().expect("addr"),
            dp,
        )
    }

    #[test]
    fn parse_ranges_and_prefixes() {
        assert_eq!(
            "80".parse::<PortRange>().expect("r"),
            PortRange { lo: 80, hi: 80 }
        );
        assert_eq!("8000-8999".parse::<PortRange>().expect("r").len(), 1000);
        for bad in ["", "x", "90-80", "70000", "1-2-3"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let p: Prefix = "192.0.2.0/24".parse().expect("p");
        assert!(p.contains("192.0.2.9".parse().expect("a")));
        assert!(p.contains("::ffff:192.0.2.9".parse().expect("a")));
        assert!(!p.contains("192.0.3.9".parse().expect("a")));
        assert!(!p.contains("2001:db8::1".parse().expect("a")));
        for bad in ["192.0.2.1/24", "192.0.2.0/33", "192.0.2.0", "nope/8"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_match_both_directions() {
        let rule = Rule {
            protocol: Some(Protocol(proto::UDP)),
            ports: Some("53".parse().expect("r")),
            prefix: None,
        };
        let q = flow(proto::UDP, "203.0.113.7", 40000, "198.51.100.53", 53);
        assert!(rule.matches(&q));
        assert!(rule.matches(&q.reversed()));
        assert!(!rule.matches(&flow(proto::TCP, "203.0.113.7", 40000, "198.51.100.53", 53)));
        assert!(!rule.matches(&flow(proto::UDP, "203.0.113.7", 40000, "198.51.100.53", 54)));
        let net = Rule {
            protocol: None,
            ports: None,
            prefix: Some("198.51.100.0/24".parse().expect("p")),
        };
        assert!(net.matches(&q) && net.matches(&q.reversed()));
        let noports = Flow::without_ports(
            proto::ICMP,
            "198.51.100.1".parse().expect("a"),
            "203.0.113.7".parse().expect("a"),
        );
        assert!(net.matches(&noports));
        assert!(!rule.matches(&noports));
    }
}
