//! An assignment from a controller's stream, checked and without wire types.

use std::collections::{BTreeMap, BTreeSet};

use crate::lease::LeaseTiming;

/// A controller as an assignment lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub id: u64,
    pub address: String,
    pub voter: bool,
}

/// What a controller streams to one member, from its applied state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub applied_index: u64,
    /// 0: the member is unknown to that controller.
    pub member_epoch: u64,
    /// `None` until the cluster is initialised.
    pub timing: Option<LeaseTiming>,
    /// bucket -> grant epoch, buckets the member may accept.
    pub owned: BTreeMap<u32, u64>,
    /// bucket -> grant epoch, buckets the member must withdraw and confirm.
    pub release: BTreeMap<u32, u64>,
    pub controllers: Vec<Controller>,
}

impl Assignment {
    pub fn voters(&self) -> BTreeSet<u64> {
        self.controllers
            .iter()
            .filter(|c| c.voter)
            .map(|c| c.id)
            .collect()
    }
}
