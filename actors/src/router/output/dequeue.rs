//! Picks up transactions that are due: retries, DSNs, store-and-forward work, and those a
//! dead replica left behind.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::Output;

/// How often an idle dequeuer looks for due work (a kick wakes it sooner).
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Dequeuer {
    output: Arc<Output>,
    running: bool,
}

impl Dequeuer {
    pub fn new(output: Arc<Output>) -> Self {
        Dequeuer {
            output,
            running: false,
        }
    }

    /// Takes due transactions while there is capacity; one storage call per transaction.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let output = self.output.clone();
        let work = async move {
            let mut started = 0usize;
            while output.has_capacity() {
                match output.storage.dequeue().await {
                    Ok(Some(record)) => {
                        output.deliver(record);
                        started += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("dequeue: {e}");
                        break;
                    }
                }
            }
            started
        };
        ctx.spawn(work.into_actor(self).map(|started, act, _| {
            act.running = false;
            if started > 0 {
                tracing::debug!(started, "dequeued");
            }
        }));
    }
}

impl Actor for Dequeuer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.drain(ctx);
        ctx.run_interval(IDLE_POLL, |act, ctx| act.drain(ctx));
    }
}

/// Look for due work now (a retry was scheduled, a DSN queued, capacity freed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick;

impl Handler<Kick> for Dequeuer {
    type Result = ();

    fn handle(&mut self, _: Kick, ctx: &mut Self::Context) {
        self.drain(ctx);
    }
}
