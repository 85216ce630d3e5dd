//! [`FdaCallback`]: moves FDA's number of sine terms `n` and the noise adaptation weight with
//! training progress (the reimplementation's per-epoch rule, [`BinaryControl::set_epoch`]).
//! Harmless for the other quantizers (their control ignores `n`, and without noise modules the
//! weight is unused).

use crate::binary::BinaryControl;
use nn_core::train::{Callback, FitContext};
use std::sync::Arc;

/// Updates a [`BinaryControl`] at the beginning of every epoch (also after a resume).
pub struct FdaCallback {
    pub control: Arc<BinaryControl>,
}

impl Callback for FdaCallback {
    fn name(&self) -> String {
        "fda-schedule".into()
    }
    fn on_epoch_begin(&mut self, epoch: usize, ctx: &FitContext) -> anyhow::Result<()> {
        self.control.set_epoch(epoch, ctx.config.epochs);
        Ok(())
    }
}
