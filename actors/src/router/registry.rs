//! Finds or starts the actor of a transaction, and supervises it: an actor that died by
//! panicking is restarted from storage; one that keeps crashing fails its transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr};
use koukan_db::{Storage, TxRecord};

use super::error::RestError;
use super::settings::Settings;
use super::transaction::TransactionActor;

/// Restarts allowed before the transaction is failed for good.
const MAX_CRASHES: u32 = 3;
pub const REASON_CRASHED: &str = "internal error: transaction actor crashed";

struct Slot {
    addr: Addr<TransactionActor>,
    crashes: u32,
}

#[derive(Clone)]
pub struct Registry {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    storage: Storage,
    settings: Arc<Settings>,
}

impl Registry {
    pub fn new(storage: Storage, settings: Arc<Settings>) -> Self {
        Registry {
            slots: Arc::default(),
            storage,
            settings,
        }
    }

    /// Number of live transaction actors.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The running actor of `rest_id`, if any (for tests and internal callers).
    pub fn get(&self, rest_id: &str) -> Option<Addr<TransactionActor>> {
        let slots = self.slots.lock().unwrap();
        slots
            .get(rest_id)
            .filter(|s| s.addr.connected())
            .map(|s| s.addr.clone())
    }

    /// Starts the actor of a transaction just created by this process.
    pub fn start(&self, record: TxRecord) -> Addr<TransactionActor> {
        self.install(record, 0)
    }

    /// The actor of `rest_id`, restarting it from storage if it is not running.
    pub async fn lookup(&self, rest_id: &str) -> Result<Addr<TransactionActor>, RestError> {
        let crashes = {
            let mut slots = self.slots.lock().unwrap();
            match slots.get(rest_id) {
                Some(slot) if slot.addr.connected() => return Ok(slot.addr.clone()),
                // Still registered but its mailbox is gone: it panicked (a clean stop
                // unregisters first).
                Some(slot) => {
                    let crashes = slot.crashes + 1;
                    slots.remove(rest_id);
                    tracing::error!(rest_id, crashes, "transaction actor crashed; restarting");
                    crashes
                }
                None => 0,
            }
        };
        if crashes >= MAX_CRASHES {
            tracing::error!(
                rest_id,
                "transaction actor keeps crashing; failing the transaction"
            );
            self.storage.fail(rest_id, REASON_CRASHED).await?;
        }
        let record = self
            .storage
            .load(rest_id)
            .await?
            .ok_or(RestError::NotFound("unknown tx"))?;
        Ok(self.install(record, crashes))
    }

    fn install(&self, record: TxRecord, crashes: u32) -> Addr<TransactionActor> {
        let mut slots = self.slots.lock().unwrap();
        // Two requests may load the same transaction at once: the first actor wins.
        if let Some(slot) = slots.get(&record.rest_id)
            && slot.addr.connected()
        {
            return slot.addr.clone();
        }
        let rest_id = record.rest_id.clone();
        let addr = TransactionActor::new(
            self.storage.clone(),
            self.settings.clone(),
            self.clone(),
            record,
        )
        .start();
        slots.insert(
            rest_id,
            Slot {
                addr: addr.clone(),
                crashes,
            },
        );
        addr
    }

    /// Unregisters a cleanly stopped actor (only if the slot is still that actor's).
    pub(super) fn remove(&self, rest_id: &str, addr: &Addr<TransactionActor>) {
        let mut slots = self.slots.lock().unwrap();
        if slots.get(rest_id).is_some_and(|s| &s.addr == addr) {
            slots.remove(rest_id);
        }
    }
}
