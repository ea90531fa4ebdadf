//! Koukan domain model: the transaction, its envelope and responses, the REST JSON shared by
//! server and client, and the configuration types. Nothing here knows about actors, HTTP
//! frameworks or databases.

pub mod backoff;
pub mod config;
pub mod filter;
pub mod mailbox;
pub mod range;
pub mod response;
pub mod rest;
pub mod rest_id;
pub mod transaction;

pub use backoff::Backoff;
pub use mailbox::{EsmtpParam, Mailbox};
pub use response::Response;
pub use transaction::{HostPort, Sender, Transaction};
