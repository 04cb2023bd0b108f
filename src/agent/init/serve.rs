//! Serving the host once PID 1 has booted: one session over a connection to the host
//! (container VMs), or a vsock listener with a thread per session (machines).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use super::boot::{power_off, BootError, LAST_WORD};
use super::session::{Agent, Outcome};
use super::vsock;
use crate::agent::protocol::{write_message, Message, AGENT_PORT, VERSION};
use crate::error_chain;

/// Container VM: one session with the host, then power off. A connection that ends
/// before the host asked for anything is the mark of a restore from a template (the
/// template's builder connected, the VM was saved, and the restore reset every vsock
/// connection): the agent connects again and serves the new host.
///
/// Meanwhile the agent also listens on vsock, as a machine's does, for further sessions
/// (`hearth oci exec` joins the container there); only the first session's end powers
/// the VM off.
pub(super) fn container_main(agent: &Arc<Agent>, fatal: Option<String>) -> ! {
    if fatal.is_none() {
        match vsock::listen(AGENT_PORT) {
            Ok(listener) => {
                let agent = agent.clone();
                let spawned = std::thread::Builder::new()
                    .name("listener".into())
                    .spawn(move || accept_sessions(&agent, &listener, None));
                if let Err(e) = spawned {
                    log::warn!("cannot start the vsock listener thread: {e}");
                }
            }
            // The container's own session does not need it.
            Err(e) => log::warn!("cannot listen on vsock port {AGENT_PORT}: {e}"),
        }
    }
    loop {
        let stream = match vsock::connect_host(AGENT_PORT) {
            Ok(s) => s,
            Err(source) => {
                let e = BootError::Connect {
                    port: AGENT_PORT,
                    source,
                };
                log::error!("{}", error_chain(&e));
                power_off();
            }
        };
        if let (Ok(dup), Ok(mut last)) = (stream.try_clone(), LAST_WORD.lock()) {
            *last = Some(dup);
        }
        if let Some(text) = fatal {
            let _ = write_message(&mut &stream, &Message::Hello { version: VERSION });
            let _ = write_message(&mut &stream, &Message::Error(text));
            power_off();
        }
        match agent.serve(stream) {
            Ok(Outcome::Idle) => {
                log::info!("the host connection ended before any request; connecting again");
                continue;
            }
            Ok(_) => {}
            Err(e) => log::error!("session: {}", error_chain(&e)),
        }
        power_off()
    }
}

/// Machine: serve sessions concurrently until one asks for a shutdown. After a fatal
/// boot error every session is answered with that error instead.
pub(super) fn machine_main(agent: &Arc<Agent>, fatal: Option<String>) -> ! {
    let listener = match vsock::listen(AGENT_PORT) {
        Ok(l) => l,
        Err(source) => {
            let e = BootError::Listen {
                port: AGENT_PORT,
                source,
            };
            log::error!("{}", error_chain(&e));
            power_off();
        }
    };
    accept_sessions(agent, &listener, fatal)
}

/// Serves every connection to `listener` on a thread of its own; a session that asks
/// for a shutdown powers the VM off.
fn accept_sessions(agent: &Arc<Agent>, listener: &OwnedFd, fatal: Option<String>) -> ! {
    loop {
        let stream = match vsock::accept(listener) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Some(text) = &fatal {
            let _ = write_message(&mut &stream, &Message::Hello { version: VERSION });
            let _ = write_message(&mut &stream, &Message::Error(text.clone()));
            continue;
        }
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("session".into())
            .spawn(move || match agent.serve(stream) {
                Ok(Outcome::PowerOff) => power_off(),
                Ok(Outcome::Done | Outcome::Idle) => {}
                Err(e) => log::info!("session: {}", error_chain(&e)),
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a session thread: {e}");
        }
    }
}
