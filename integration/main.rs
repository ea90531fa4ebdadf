//! Tests that run the real binaries as separate processes and talk HTTP and SMTP to them.

mod e2e;
mod harness;
mod router_cluster;
mod router_delivery;
mod router_process;
