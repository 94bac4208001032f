//! Who may use an admin endpoint and where it listens: the `[admin]` settings, a bearer token compared in constant time, and the rule that an endpoint off loopback needs a token and TLS (or an explicit `insecure_plaintext`).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::tls::ServerTls;

/// An admin endpoint's settings: the `[admin]` section of stdd's and tmd's
/// configurations, listening on loopback port `PORT` by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig<const PORT: u16> {
    /// Listen address. Anything but loopback requires `token`, and `tls`
    /// unless `insecure_plaintext`.
    #[serde(default = "loopback::<PORT>")]
    pub listen: SocketAddr,
    /// Bearer token (`Authorization: Bearer …`), required off loopback.
    #[serde(default)]
    pub token: Option<String>,
    /// HTTPS (`[admin.tls]`), with client certificates when it names a CA.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Allows plain HTTP off loopback (the token then crosses the network
    /// in the clear): an explicit choice, never a default.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// `127.0.0.1:PORT`.
pub fn loopback<const PORT: u16>() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

impl<const PORT: u16> Default for AdminConfig<PORT> {
    fn default() -> Self {
        AdminConfig::plain(loopback::<PORT>(), None)
    }
}

impl<const PORT: u16> AdminConfig<PORT> {
    /// Plain HTTP on `listen` with `token` (no TLS, no insecure flag).
    pub fn plain(listen: SocketAddr, token: Option<String>) -> Self {
        AdminConfig {
            listen,
            token,
            tls: None,
            insecure_plaintext: false,
        }
    }

    /// The loopback rule for these settings: `Some((key, why))` is the
    /// setting that is missing and why. Off loopback an endpoint needs a
    /// token, and TLS unless `insecure_plaintext` says plain HTTP is meant.
    pub fn insecure(&self) -> Option<(&'static str, String)> {
        if self.listen.ip().is_loopback() {
            return None;
        }
        if self.token.as_deref().is_none_or(str::is_empty) {
            return Some((
                "admin.token",
                format!(
                    "required when admin.listen ({}) is not a loopback address",
                    self.listen
                ),
            ));
        }
        if self.tls.is_none() && !self.insecure_plaintext {
            return Some((
                "admin.tls",
                format!(
                    "required when admin.listen ({}) is not a loopback address (or set admin.insecure_plaintext = true to send the token in the clear)",
                    self.listen
                ),
            ));
        }
        None
    }

    /// What `stdd`/`tmd check-config` report about these settings beyond
    /// the loopback rule (which loading the file already applies): TLS
    /// files that do not load, a TLS key readable by every user.
    pub fn problems(&self) -> Vec<String> {
        let Some(tls) = &self.tls else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        if let Err(e) = tls.load() {
            problems.push(e.to_string());
        }
        if let Some(p) =
            cli_common::secret::readable_by_all(&tls.key, "the admin endpoint's TLS key")
        {
            problems.push(format!("admin.tls.key {p}"));
        }
        problems
    }

    /// `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
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

/// The loopback rule (see [`AdminConfig::insecure`]). `Err` is the one-line reason.
pub fn check_listen<const P: u16>(admin: &AdminConfig<P>) -> Result<(), String> {
    match admin.insecure() {
        Some((key, why)) => Err(format!("{key} is {why}")),
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
        let plain =
            |listen, token: Option<&str>| AdminConfig::<0>::plain(listen, token.map(str::to_owned));
        assert!(check_listen(&plain(lo, None)).is_ok());
        assert!(check_listen(&plain(any, None))
            .is_err_and(|e| e.starts_with("admin.token is required")));
        assert!(check_listen(&plain(any, Some(""))).is_err());
        // A token is not enough off loopback: TLS, or plain HTTP said out loud.
        assert!(check_listen(&plain(any, Some("t"))).is_err_and(|e| e
            .starts_with("admin.tls is required")
            && e.contains("insecure_plaintext")));
        let mut insecure = plain(any, Some("t"));
        insecure.insecure_plaintext = true;
        assert!(check_listen(&insecure).is_ok());
        let mut tls = plain(any, Some("t"));
        tls.tls = Some(ServerTls {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
        });
        assert!(check_listen(&tls).is_ok());
        assert_eq!(tls.scheme(), "https");
    }
}
