//! Koukan's actor systems: the router service (REST transactions as long-running
//! operations, storage, housekeeping) and the SMTP gateway, plus the command-line tools.

pub mod client;
pub mod gateway;
pub mod logging;
pub mod rest_server;
pub mod router;
pub mod signals;
pub mod tls;
pub mod tools;
