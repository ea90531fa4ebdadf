//! Session heartbeat, recovery of dead replicas' transactions, and garbage collection.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use koukan_db::Storage;

use super::settings::Settings;

pub struct Housekeeper {
    storage: Storage,
    settings: Arc<Settings>,
    last_refresh: Instant,
}

impl Housekeeper {
    pub fn new(storage: Storage, settings: Arc<Settings>) -> Self {
        Housekeeper {
            storage,
            settings,
            last_refresh: Instant::now(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let storage = self.storage.clone();
        let ttl = self.settings.session_ttl();
        let work = async move {
            let live = storage.refresh_session().await;
            if let Err(e) = storage.recover(ttl).await {
                tracing::warn!("session recovery: {e}");
            }
            live
        };
        ctx.spawn(work.into_actor(self).map(|live, act, _| match live {
            Ok(true) => act.last_refresh = Instant::now(),
            Ok(false) => {
                // Declared dead by a peer: our leases are gone; stop before writing more.
                tracing::error!("storage session declared dead; shutting down");
                System::current().stop();
            }
            Err(e) => {
                tracing::warn!("session refresh failed: {e}");
                // Stop well before peers declare us dead (10 intervals).
                if act.last_refresh.elapsed() > act.settings.session_refresh_interval * 5 {
                    tracing::error!("no session refresh for 5 intervals; shutting down");
                    System::current().stop();
                }
            }
        }));
    }
}

impl Actor for Housekeeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.tick(ctx);
        ctx.run_interval(self.settings.session_refresh_interval, |act, ctx| {
            act.tick(ctx)
        });
        if let Some(interval) = self.settings.gc_interval {
            let run_gc = |act: &mut Self, ctx: &mut Context<Self>| {
                let storage = act.storage.clone();
                let ttl = act.settings.gc_ttl;
                ctx.spawn(
                    async move {
                        match storage.gc(ttl).await {
                            Ok((txs, blobs)) if txs + blobs > 0 => {
                                tracing::info!(txs, blobs, "garbage collected")
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!("gc: {e}"),
                        }
                    }
                    .into_actor(act),
                );
            };
            run_gc(self, ctx);
            ctx.run_interval(interval, run_gc);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for Housekeeper {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
