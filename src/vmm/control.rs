//! Driving a running VM from another thread: a [`VmmController`] (any thread, cloneable)
//! sends requests that a [`ControlChannel`], the [`ControlHook`] given to
//! [`Vmm::run_with`], carries out on the event-loop thread and answers.
//!
//! ```no_run
//! # fn demo(vmm: hearth::vmm::Vmm) -> Result<(), Box<dyn std::error::Error>> {
//! let (controller, mut channel) = hearth::vmm::control_channel()?;
//! let running = std::thread::spawn(move || vmm.run_with(&mut channel));
//! controller.pause()?;
//! controller.resume()?;
//! # Ok(()) }
//! ```

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ControlHook, Vmm, VmmError};

/// What a controller can ask of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    Pause,
    Resume,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is not running any more")]
    Stopped,
    #[error("cannot {request:?} the VM")]
    Failed {
        request: ControlRequest,
        #[source]
        source: VmmError,
    },
    #[error("cannot wake the VM's event loop")]
    Wake(#[source] std::io::Error),
}

type Reply = Sender<Result<(), VmmError>>;

/// Asks a running VM to pause or resume, from any thread. Each call returns once the VM
/// has done it (or failed to).
#[derive(Clone)]
pub struct VmmController {
    requests: Sender<(ControlRequest, Reply)>,
    wake: Arc<EventFd>,
}

impl VmmController {
    /// See [`Vmm::pause`].
    pub fn pause(&self) -> Result<(), ControlError> {
        self.ask(ControlRequest::Pause)
    }

    /// See [`Vmm::resume`].
    pub fn resume(&self) -> Result<(), ControlError> {
        self.ask(ControlRequest::Resume)
    }

    fn ask(&self, request: ControlRequest) -> Result<(), ControlError> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send((request, reply))
            .map_err(|_| ControlError::Stopped)?;
        self.wake.write(1).map_err(ControlError::Wake)?;
        // A VM that stops first drops the request, and with it the reply sender.
        match answer.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ControlError::Failed { request, source }),
            Err(_) => Err(ControlError::Stopped),
        }
    }
}

/// The event-loop side of a [`VmmController`]: pass it to [`Vmm::run_with`].
pub struct ControlChannel {
    requests: Receiver<(ControlRequest, Reply)>,
    wake: Arc<EventFd>,
}

/// A connected controller and channel.
pub fn control_channel() -> std::io::Result<(VmmController, ControlChannel)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        VmmController {
            requests: tx,
            wake: wake.clone(),
        },
        ControlChannel { requests: rx, wake },
    ))
}

impl ControlHook for ControlChannel {
    fn start(&mut self, vmm: &mut Vmm) {
        use event_manager::SubscriberOps as _;
        vmm.event_loop()
            .add_subscriber(Box::new(WakeWatcher(self.wake.clone())));
    }

    fn after_events(&mut self, vmm: &mut Vmm) {
        while let Ok((request, reply)) = self.requests.try_recv() {
            let result = match request {
                ControlRequest::Pause => vmm.pause(),
                ControlRequest::Resume => vmm.resume(),
            };
            // The controller may have given up waiting; nothing to tell then.
            let _ = reply.send(result);
        }
    }
}

/// Wakes the event loop for a controller's request (the loop then calls the hook).
struct WakeWatcher(Arc<EventFd>);

impl MutEventSubscriber for WakeWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.as_ref(), EventSet::IN)) {
            log::error!("cannot watch the control eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_without_a_vm_reports_it_stopped() {
        let (controller, channel) = control_channel().unwrap();
        drop(channel);
        assert!(matches!(controller.pause(), Err(ControlError::Stopped)));
    }

    #[test]
    fn requests_wake_the_loop_and_are_queued_in_order() {
        let (controller, channel) = control_channel().unwrap();
        let asker = std::thread::spawn(move || controller.resume());
        let (request, reply) = channel.requests.recv().unwrap();
        assert_eq!(request, ControlRequest::Resume);
        reply
            .send(Err(VmmError::State(
                super::super::RunState::Running,
                super::super::RunState::Paused,
            )))
            .unwrap();
        assert!(matches!(
            asker.join().unwrap(),
            Err(ControlError::Failed {
                request: ControlRequest::Resume,
                ..
            })
        ));
        // The request was followed by a wake-up of the event loop.
        assert_eq!(channel.wake.read().unwrap(), 1);
    }
}
