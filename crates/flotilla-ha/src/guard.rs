//! The crash guard: a small companion process that outlives a crashed lb.
//!
//! A master whose lb process dies (panic, OOM kill, SIGKILL) leaves its VIP on the
//! interface and falls silent; the backup would wait the full master-down interval
//! (~0.36 s at the defaults) while the dead master's kernel refuses every new
//! connection. The guard holds the read end of a pipe from the lb. When the pipe
//! closes without a goodbye byte, the lb is gone: if the VIP is on the interface, the
//! guard sends the priority-0 advert the lb could not, and removes the VIP. The backup
//! then takes over after its skew alone (~60 ms). A host that dies takes the guard
//! with it; that case is the master-down interval's.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::codec::{group_of, Advert};
use crate::config::HaConfig;
use crate::net::{Interface, VrrpSocket};
use crate::vip::VipControl;

/// Environment variable carrying the guard's config (JSON).
pub const CONFIG_ENV: &str = "FLOTILLA_HA_GUARD_CONFIG";

/// The lb's handle on its guard.
pub struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Starts `exe ha-guard` (the flotilla binary) in its own process group, so signals
/// meant for the lb's group do not reach it.
pub fn spawn(cfg: &HaConfig, exe: &Path) -> std::io::Result<Guard> {
    use std::os::unix::process::CommandExt;
    let json = serde_json::to_string(cfg).map_err(std::io::Error::other)?;
    let mut child = Command::new(exe)
        .arg("ha-guard")
        .env(CONFIG_ENV, json)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()?;
    let stdin = child.stdin.take();
    Ok(Guard { child, stdin })
}

impl Guard {
    /// A graceful exit: the guard leaves without acting.
    pub fn disarm(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"x");
        }
        let _ = self.child.wait();
    }
}

/// The guard process's body (`flotilla ha-guard`): waits for its lb to go away.
pub fn run() -> Result<(), String> {
    let json = std::env::var(CONFIG_ENV).map_err(|_| format!("{CONFIG_ENV} is not set"))?;
    let cfg: HaConfig = serde_json::from_str(&json).map_err(|e| format!("guard config: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        // Everything is opened up front: when the lb dies there is no time to lose.
        let iface = Interface::lookup(&cfg.interface, cfg.is_ipv6()).map_err(|e| e.to_string())?;
        let sock = VrrpSocket::open(&iface).map_err(|e| e.to_string())?;
        let vip = VipControl::open(iface.index).map_err(|e| e.to_string())?;
        let goodbye = tokio::task::spawn_blocking(|| {
            let mut b = [0u8; 1];
            matches!(std::io::stdin().read(&mut b), Ok(1))
        })
        .await
        .unwrap_or(false);
        if goodbye {
            return Ok(());
        }
        let vips = cfg.vips();
        let mut held = false;
        for v in &vips {
            held |= vip.present(*v).await.unwrap_or(false);
        }
        if !held {
            return Ok(()); // it was not master
        }
        let advert = Advert {
            vrid: cfg.virtual_router_id,
            priority: 0,
            interval_cs: cfg.interval_cs(),
            addrs: vips.iter().map(|v| v.addr).collect(),
        };
        let dsts = if cfg.unicast_peers.is_empty() {
            vec![group_of(iface.addr)]
        } else {
            cfg.unicast_peers.clone()
        };
        for dst in dsts {
            let _ = sock
                .send(&advert.encode(iface.addr, dst, cfg.checksum), dst)
                .await;
        }
        for v in &vips {
            let _ = vip.remove(*v).await;
        }
        tracing::warn!("the lb died while master: sent its priority-0 advert and released the VIP");
        Ok(())
    })
}
