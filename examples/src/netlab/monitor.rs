//! The role monitor: a helper process inside a node's own namespace that
//! asks the node for its status every ~50 ms over 127.0.0.1 and writes one
//! JSON line per answer (or per failure to answer).
//!
//! It runs beside the node rather than on the client host so that it still
//! sees the node when every cable of that node is pulled: that is exactly
//! when two actives could happen unseen. A frozen or killed node gives
//! samples with no role.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use twinmq_client::{AdminClient, ClientConfig};

use super::proc::{now_us, JsonLines};

/// One status poll: the role held at some instant between `t0` (request
/// sent) and `t1` (answer received), both wall-clock microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub node: String,
    pub t0: u64,
    pub t1: u64,
    /// `None`: no answer within the poll's timeout (killed, frozen, starting).
    pub role: Option<String>,
    pub epoch: Option<u64>,
    pub last_op: Option<u64>,
    pub in_sync: Option<bool>,
    /// The node's view of its peer: up | silent | dead.
    pub peer: Option<String>,
    pub gateway: Option<bool>,
    /// The node's store history, `(epoch, first op, forced)` per promotion,
    /// oldest first; written only in a sample where it changed (or after a
    /// sample with no answer), so readers carry the last one forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<(u64, u64, bool)>>,
    /// Why the node's disk counts as failed (its status' `store.disk_failure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_failure: Option<String>,
}

impl Sample {
    /// The role, or `down` when the node did not answer.
    pub fn role(&self) -> &str {
        self.role.as_deref().unwrap_or("down")
    }

    /// `active` or `active-alone`: serving clients.
    pub fn is_active(&self) -> bool {
        self.role().starts_with("active")
    }

    /// Passive, in sync with the active, peer up.
    pub fn is_in_sync_passive(&self) -> bool {
        self.role() == "passive" && self.in_sync == Some(true)
    }
}

/// `cable-lab monitor`: poll `addr` every `interval` until killed.
pub async fn run(node: &str, addr: &str, out: &Path, interval: Duration) -> anyhow::Result<()> {
    let lines = JsonLines::create(out)?;
    let config = ClientConfig::new([addr.to_string()])
        .connect_timeout(Duration::from_millis(300))
        .failover_timeout(Duration::from_millis(600));
    let mut admin: Option<AdminClient> = None;
    // The history last written: repeated only when it changes.
    let mut last_history: Option<Vec<(u64, u64, bool)>> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t0 = now_us();
        let status = poll(&mut admin, addr, &config).await;
        if status.is_none() {
            // A fresh connection next time: this one may be stuck behind a frozen node.
            admin = None;
        }
        let s = status.unwrap_or(serde_json::Value::Null);
        let history: Option<Vec<(u64, u64, bool)>> = serde_json::from_value(s["history"].clone()).ok();
        let changed = history.is_some() && history != last_history;
        last_history = history.clone();
        let sample = Sample {
            node: node.to_string(),
            t0,
            t1: now_us(),
            role: s["role"].as_str().map(str::to_string),
            epoch: s["epoch"].as_u64(),
            last_op: s["last_op"].as_u64(),
            in_sync: s["in_sync"].as_bool(),
            peer: s["peer"]["state"].as_str().map(str::to_string),
            gateway: s["gateway"]["reachable"].as_bool(),
            history: if changed { history } else { None },
            disk_failure: s["store"]["disk_failure"].as_str().map(str::to_string),
        };
        lines.write(&serde_json::to_value(&sample)?);
    }
}

async fn poll(admin: &mut Option<AdminClient>, addr: &str, config: &ClientConfig) -> Option<serde_json::Value> {
    let fut = async {
        if admin.is_none() {
            *admin = Some(AdminClient::connect_to(addr, config).await.ok()?);
        }
        let status = admin.as_mut()?.status().await.ok()?;
        serde_json::from_str(status.json()).ok()
    };
    tokio::time::timeout(Duration::from_millis(600), fut).await.ok().flatten()
}
