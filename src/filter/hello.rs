//! `hello`: the original's example plugin filter, built in: it passes every transaction on
//! unchanged (a template for filters written against the [`Filter`] trait).

use super::{ChainTx, Filter, LocalFuture, Next};

#[derive(Default)]
pub struct Hello;

impl Filter for Hello {
    fn on_update<'a>(&'a mut self, tx: &'a mut ChainTx, next: Next<'a>) -> LocalFuture<'a, ()> {
        next.run(tx)
    }
}
