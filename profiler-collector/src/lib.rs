//! The collector: gRPC ingest of agents' batches into a store, and the HTTP
//! query API with its web UI. See [`server::start`].
pub mod auth;
pub mod clock;
pub mod config;
pub mod contention;
pub mod gogc;
pub mod http;
pub mod import;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod overload;
pub mod receivers;
pub mod refusal;
pub mod render;
pub mod scrape;
pub mod selection;
pub mod server;
pub mod store;
pub mod validate;
pub mod wall;
pub mod writer;
