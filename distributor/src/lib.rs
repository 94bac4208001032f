//! Distributor data path. Placeholder crate: the steering code and `stdd` arrive with issue 3.
#![deny(missing_docs)]
