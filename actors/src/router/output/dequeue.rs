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
    /// A kick arrived while a drain was running: drain once more when it ends.
    again: bool,
    /// A delivery ended while a drain was running: drain once more if that one starved.
    freed: bool,
    /// The last drain stopped for lack of capacity, not for lack of due work: a finished
    /// delivery is then worth another look (otherwise it cannot make anything due).
    starved: bool,
}

impl Dequeuer {
    pub fn new(output: Arc<Output>) -> Self {
        Dequeuer {
            output,
            running: false,
            again: false,
            freed: false,
            starved: false,
        }
    }

    /// Takes due transactions while there is capacity; one storage call per transaction.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            self.again = true;
            return;
        }
        self.running = true;
        let output = self.output.clone();
        let work = async move {
            let mut started = 0usize;
            let starved = loop {
                if !output.has_capacity() {
                    break true;
                }
                match output.storage.dequeue().await {
                    Ok(Some(record)) => {
                        output.deliver(record);
                        started += 1;
                    }
                    Ok(None) => break false,
                    Err(e) => {
                        tracing::warn!("dequeue: {e}");
                        break false;
                    }
                }
            };
            (started, starved)
        };
        ctx.spawn(work.into_actor(self).map(|(started, starved), act, ctx| {
            act.running = false;
            act.starved = starved;
            if started > 0 {
                tracing::debug!(started, "dequeued");
            }
            let freed = std::mem::take(&mut act.freed);
            if std::mem::take(&mut act.again) || (freed && starved) {
                act.drain(ctx);
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

/// Look for due work now (a retry was scheduled, a DSN queued, work stored for later).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick;

impl Handler<Kick> for Dequeuer {
    type Result = ();

    fn handle(&mut self, _: Kick, ctx: &mut Self::Context) {
        self.drain(ctx);
    }
}

/// A delivery ended, so there is capacity again. Only worth a look when the last drain
/// left due work behind: under load this arrives once per delivery, and a dequeue that
/// finds nothing still costs a write batch.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Freed;

impl Handler<Freed> for Dequeuer {
    type Result = ();

    fn handle(&mut self, _: Freed, ctx: &mut Self::Context) {
        if self.running {
            self.freed = true;
        } else if self.starved {
            self.drain(ctx);
        }
    }
}
