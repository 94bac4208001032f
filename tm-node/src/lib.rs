//! Traffic-manager node. Placeholder crate: `tmd` arrives with issue 4.
#![deny(missing_docs)]
