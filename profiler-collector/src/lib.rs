//! The collector: gRPC ingest of agents' batches, storage, and the HTTP
//! query API with its web UI.
pub mod model;
pub mod query;
pub mod store;
pub mod validate;
