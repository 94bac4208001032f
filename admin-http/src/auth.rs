//! Who may use an admin endpoint and where it listens: the `[admin]` settings, a bearer token compared in constant time, and the rule that an endpoint off loopback needs one.

use std::net::SocketAddr;

use serde::Deserialize;

/// An admin endpoint's settings: the `[admin]` section of stdd's and tmd's
/// configurations, listening on loopback port `PORT` by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig<const PORT: u16> {
    /// Listen address. Anything but loopback requires `token`.
    #[serde(default = "loopback::<PORT>")]
    pub listen: SocketAddr,
    /// Bearer token (`Authorization: Bearer …`), required off loopback.
    #[serde(default)]
    pub token: Option<String>,
}

/// `127.0.0.1:PORT`.
pub fn loopback<const PORT: u16>() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

impl<const PORT: u16> Default for AdminConfig<PORT> {
    fn default() -> Self {
        AdminConfig {
            listen: loopback::<PORT>(),
            token: None,
        }
    }
}

impl<const PORT: u16> AdminConfig<PORT> {
    /// The loopback rule for these settings (see [`check_listen`]): `Some`
    /// is why they are refused, to be reported against `admin.token`.
    pub fn insecure(&self) -> Option<String> {
        let off_loopback = !self.listen.ip().is_loopback();
        (off_loopback && self.token.as_deref().is_none_or(str::is_empty)).then(|| {
            format!(
                "required when admin.listen ({}) is not a loopback address",
                self.listen
            )
        })
    }
}

/// Compares without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when `authorization` (the header's value, if any) carries `token`,
/// or no token is required.
pub fn authorised(token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    let Some(token) = token else { return true };
    authorization
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim_ascii(), token.as_bytes()))
}

/// The loopback rule: an endpoint listening anywhere but loopback must
/// require a token. `Err` is the one-line reason.
pub fn check_listen(listen: SocketAddr, token: Option<&str>) -> Result<(), String> {
    let settings = AdminConfig::<0> {
        listen,
        token: token.map(str::to_owned),
    };
    match settings.insecure() {
        Some(why) => Err(format!("admin.token is {why}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn tokens_and_the_loopback_rule() {
        assert!(authorised(None, None));
        assert!(authorised(Some("s3"), Some(b"Bearer s3")));
        assert!(authorised(Some("s3"), Some(b"Bearer s3 ")));
        assert!(!authorised(Some("s3"), Some(b"Bearer s4")));
        assert!(!authorised(Some("s3"), Some(b"Basic s3")));
        assert!(!authorised(Some("s3"), None));
        let lo: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:9".parse().expect("addr");
        assert!(check_listen(lo, None).is_ok());
        assert!(check_listen(any, Some("t")).is_ok());
        assert!(check_listen(any, None).is_err());
        assert!(check_listen(any, Some("")).is_err());
    }
}
