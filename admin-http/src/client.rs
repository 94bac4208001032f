//! The typed admin client: one node's endpoint, its requests as the coordinator's [`Call`]s, and every answer parsed into its message type — a missing field or an unreadable body is an error naming the node, never a default.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use control::api::{
    AbortAnswer, CommitAnswer, DistributorTransition, HeldPort, TmPins, TmTransition,
};
use control::coordinator::{Answer, Call, CallError};
use serde::de::DeserializeOwned;

/// Largest answer read (a table file is at most 16 MiB).
pub const MAX_ANSWER_BYTES: u64 = 17 * 1024 * 1024;

/// A node's admin endpoint (as stdctl's cluster file lists it: `name`,
/// `admin`, `token`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Name for humans (defaulted by the cluster file's reader).
    #[serde(default)]
    pub name: String,
    /// Base URL, `http://host:port` or `https://host:port`.
    #[serde(rename = "admin")]
    pub url: String,
    /// Bearer token, if the endpoint wants one.
    #[serde(default)]
    pub token: Option<String>,
}

/// Calls admin endpoints, each request bounded by one timeout.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// An agent with `tls` (its CA and client certificate) for `https://` URLs.
/// Without it an `https://` URL fails: nothing is trusted by default.
pub fn agent(builder: ureq::AgentBuilder, tls: Option<&Arc<rustls::ClientConfig>>) -> ureq::Agent {
    match tls.cloned().or_else(no_trust) {
        Some(t) => builder.tls_config(t).build(),
        None => builder.build(),
    }
}

/// A TLS client configuration that trusts no certificate: an `https://`
/// endpoint without a configured CA fails its handshake, by name. (`None`
/// only if ring lacked the default protocol versions, which it does not.)
fn no_trust() -> Option<Arc<rustls::ClientConfig>> {
    #[allow(deprecated)] // ring: see tls::provider
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Some(Arc::new(config))
}

impl Client {
    /// A client whose every request gives up after `timeout` (plain HTTP;
    /// `https://` endpoints need [`Client::with_tls`]).
    pub fn new(timeout: Duration) -> Self {
        Client::with_tls(timeout, None)
    }

    /// A client for `http://` and, with `tls`, `https://` endpoints.
    pub fn with_tls(timeout: Duration, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        let builder = ureq::AgentBuilder::new().timeout(timeout.max(Duration::from_millis(1)));
        Client {
            agent: agent(builder, tls.as_ref()),
            tls,
        }
    }

    /// One request: the status and the body text, or why there was none.
    pub fn request(
        &self,
        node: &Endpoint,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), CallError> {
        let url = format!("{}{}", node.url.trim_end_matches('/'), path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &node.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        let (code, r) = match res {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(e) => return Err(CallError::NoAnswer(e.to_string())),
        };
        let mut text = String::new();
        r.into_reader()
            .take(MAX_ANSWER_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| CallError::NoAnswer(format!("reading the answer: {e}")))?;
        Ok((code, text))
    }

    /// A GET whose 200 answer is read as it streams (a capture): each read
    /// waits at most `idle`, the whole answer as long as it lasts. Any
    /// other status is [`CallError::Status`] with the answer's text.
    pub fn stream(
        &self,
        node: &Endpoint,
        path: &str,
        idle: Duration,
    ) -> Result<Box<dyn Read + Send>, CallError> {
        let builder = ureq::AgentBuilder::new()
            .timeout_connect(idle)
            .timeout_read(idle);
        let agent = agent(builder, self.tls.as_ref());
        let url = format!("{}{}", node.url.trim_end_matches('/'), path);
        let mut req = agent.get(&url);
        if let Some(t) = &node.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => Ok(Box::new(r.into_reader())),
            Err(ureq::Error::Status(code, r)) => {
                let mut text = String::new();
                let _ = r.into_reader().take(64 * 1024).read_to_string(&mut text);
                Err(CallError::Status(code, text))
            }
            Err(e) => Err(CallError::NoAnswer(e.to_string())),
        }
    }

    /// A 200 answer's body; any other status is [`CallError::Status`].
    pub fn ok_text(
        &self,
        node: &Endpoint,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<String, CallError> {
        match self.request(node, method, path, body)? {
            (200, text) => Ok(text),
            (code, text) => Err(CallError::Status(code, text)),
        }
    }

    /// A 200 answer's body as JSON of type `T`.
    pub fn ok_json<T: DeserializeOwned>(
        &self,
        node: &Endpoint,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<T, CallError> {
        let text = self.ok_text(node, method, path, body)?;
        serde_json::from_str(&text).map_err(|e| CallError::Garbage(e.to_string()))
    }

    /// Carries a coordinator call to `node`.
    pub fn call(&self, node: &Endpoint, call: &Call) -> Result<Answer, CallError> {
        let json = |v: &dyn erased::Json| v.text();
        match call {
            Call::Prepare(req) => self
                .ok_json::<TmTransition>(node, "POST", "/transition/prepare", Some(&json(req)))
                .map(Answer::Tm),
            Call::HeldPorts => self
                .ok_json::<Vec<HeldPort>>(node, "GET", "/transition/ports", None)
                .map(Answer::Held),
            Call::TmState => self
                .ok_json::<TmTransition>(node, "GET", "/transition", None)
                .map(Answer::Tm),
            Call::Pins => self
                .ok_json::<TmPins>(node, "GET", "/transition/pins", None)
                .map(Answer::Pins),
            Call::Switch(table) => self
                .ok_json::<DistributorTransition>(node, "POST", "/transition/switch", Some(table))
                .map(Answer::Distributor),
            Call::Open(id) => self
                .ok_json::<DistributorTransition>(node, "POST", "/transition/open", Some(&json(id)))
                .map(Answer::Distributor),
            Call::DistributorState => self
                .ok_json::<DistributorTransition>(node, "GET", "/transition", None)
                .map(Answer::Distributor),
            Call::Commit(id) => self
                .ok_json::<CommitAnswer>(node, "POST", "/transition/commit", Some(&json(id)))
                .map(Answer::Committed),
            Call::Abort(id) => {
                let body = id.as_ref().map(|i| json(i));
                self.ok_json::<AbortAnswer>(node, "POST", "/transition/abort", body.as_deref())
                    .map(Answer::Aborted)
            }
        }
    }
}

mod erased {
    //! JSON text of any request message.
    pub trait Json {
        fn text(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn text(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
