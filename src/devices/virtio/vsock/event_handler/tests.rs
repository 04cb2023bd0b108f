//! The device driven through a real `EventManager`: activation hand-off, queue
//! notifications, host sockets, reset and re-activation.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};

use super::super::device::tests::{guest_header, memory, new_vsock, ops, Driver, GUEST_CID};
use super::super::packet::{
    VsockHeader, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::super::VSOCK_HOST_CID;
use super::*;
use crate::devices::bus::lock;
use crate::devices::virtio::VirtioDevice;

type Loop = EventManager<Arc<Mutex<Vsock>>>;

const VERSION_1: u64 = 1 << 32;

/// Runs the event loop until `done` holds, for at most about five seconds.
fn run_until(manager: &mut Loop, mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..250 {
        if done() {
            return true;
        }
        manager.run_with_timeout(20).unwrap();
    }
    done()
}

/// Runs the loop until the driver has received `count` more packets; returns them.
fn receive(manager: &mut Loop, driver: &mut Driver, count: usize) -> Vec<(VsockHeader, Vec<u8>)> {
    let mut packets = Vec::new();
    run_until(manager, || {
        packets.extend(driver.received());
        packets.len() >= count
    });
    assert_eq!(packets.len(), count, "{packets:?}");
    packets
}

/// Runs the loop until it is idle: `run_with_timeout(0)` dispatching nothing.
fn settle(manager: &mut Loop) {
    for _ in 0..10 {
        if manager.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("the event loop keeps dispatching");
}

fn host_connect(uds: &Path, port: u32) -> UnixStream {
    let mut host = UnixStream::connect(uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(host, "CONNECT {port}").unwrap();
    host
}

fn read_exact(host: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    host.read_exact(&mut buf).unwrap();
    buf
}

fn assert_closed(host: &mut UnixStream) {
    let mut buf = [0u8; 16];
    match host.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "the host stream is still open"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

/// The guest accepts the REQUEST in `request`: returns the host port it came from, after
/// checking the host read `OK <port>\n`.
fn accept(
    manager: &mut Loop,
    driver: &mut Driver,
    host: &mut UnixStream,
    request: &VsockHeader,
) -> u32 {
    assert_eq!(request.op, OP_REQUEST);
    assert_eq!(
        (request.src_cid, request.dst_cid, request.type_),
        (VSOCK_HOST_CID, GUEST_CID, TYPE_STREAM)
    );
    let local = request.src_port;
    driver.send(guest_header(OP_RESPONSE, request.dst_port, local), b"");
    driver.kick_tx();
    manager.run_with_timeout(1000).unwrap();
    let line = format!("OK {local}\n");
    assert_eq!(read_exact(host, line.len()), line.as_bytes());
    local
}

#[test]
fn host_connection_activate_reset_and_activate_again() {
    let mem = memory();
    let (_dir, uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    manager.add_subscriber(vsock.clone());
    // Only the listening socket and the queue eventfds are watched while inactive.
    settle(&mut manager);
    assert_eq!(lock(&vsock).watched_host.len(), 1);

    for round in 0..2u64 {
        let mut driver = Driver::new(&mem, round * 0x10_0000);
        driver.post_rx(8);
        driver.activate(&mut lock(&vsock), VERSION_1);
        manager.run_with_timeout(1000).unwrap();

        // A host process asks for guest port 5000.
        let mut host = host_connect(&uds, 5000);
        let packets = receive(&mut manager, &mut driver, 1);
        let request = packets[0].0;
        assert_eq!(request.dst_port, 5000);
        assert!(driver.interrupts() > 0);
        let local = accept(&mut manager, &mut driver, &mut host, &request);
        assert_eq!(driver.tx.used().len(), 1);
        assert_eq!(lock(&vsock).connection_count(), 1);

        // Host to guest.
        host.write_all(b"hello guest").unwrap();
        let packets = receive(&mut manager, &mut driver, 1);
        assert_eq!(ops(&packets), [OP_RW]);
        assert_eq!(packets[0].1, b"hello guest");
        assert_eq!(
            (packets[0].0.src_port, packets[0].0.dst_port),
            (local, 5000)
        );

        // Guest to host.
        driver.send(guest_header(OP_RW, 5000, local), b"hello host");
        driver.kick_tx();
        manager.run_with_timeout(1000).unwrap();
        assert_eq!(read_exact(&mut host, 10), b"hello host");
        assert_eq!(driver.tx.used().len(), 2);
        settle(&mut manager);

        // Reset: the host stream closes, notifications are consumed and serve nothing.
        lock(&vsock).reset();
        assert!(!lock(&vsock).is_active());
        manager.run_with_timeout(1000).unwrap();
        assert_closed(&mut host);
        assert_eq!(lock(&vsock).watched_host.len(), 1);
        assert_eq!(lock(&vsock).connection_count(), 0);
        settle(&mut manager);
        driver.send(guest_header(OP_RW, 5000, local), b"late");
        driver.kick_rx();
        driver.kick_tx();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 2);
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        assert_eq!(driver.tx.used().len(), 2);
    }
}

/// A TX packet queued before activation is served once the event loop takes over; reset
/// and activate again before the loop runs serves the new rings only.
#[test]
fn quick_rebind_and_packets_before_activation() {
    let mem = memory();
    let (_dir, _uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    manager.add_subscriber(vsock.clone());

    let mut driver = Driver::new(&mem, 0);
    driver.post_rx(4);
    driver.send(guest_header(OP_RW, 1, 2), b"early");
    driver.activate(&mut lock(&vsock), VERSION_1);
    assert_eq!(ops(&receive(&mut manager, &mut driver, 1)), [OP_RST]);
    assert_eq!(driver.tx.used().len(), 1);

    let mut second = Driver::new(&mem, 0x10_0000);
    second.post_rx(4);
    {
        let mut device = lock(&vsock);
        device.reset();
        second.activate(&mut device, VERSION_1);
    }
    settle(&mut manager);
    // The first driver's rings are not served any more.
    driver.send(guest_header(OP_RW, 1, 2), b"old");
    second.send(guest_header(OP_RW, 1, 2), b"x");
    second.kick_tx();
    assert_eq!(ops(&receive(&mut manager, &mut second, 1)), [OP_RST]);
    assert_eq!(driver.tx.used().len(), 1);
    assert!(driver.received().is_empty());
}

/// A paused device serves neither the guest's packets nor the host's connections; once
/// resumed it serves both.
#[test]
fn pause_and_resume() {
    let mem = memory();
    let (_dir, uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    let id = manager.add_subscriber(vsock.clone());
    let mut driver = Driver::new(&mem, 0);
    driver.post_rx(8);
    driver.activate(&mut lock(&vsock), VERSION_1);
    settle(&mut manager);

    lock(&vsock).pause(&mut manager.event_ops(id).unwrap());
    assert!(lock(&vsock).is_paused());
    assert!(lock(&vsock).watched_host.is_empty());
    driver.send(guest_header(OP_RW, 1, 2), b"while paused");
    driver.kick_tx();
    let mut host = host_connect(&uds, 5000);
    for _ in 0..3 {
        assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    }
    assert!(driver.tx.used().is_empty());
    assert!(driver.received().is_empty());
    assert_eq!(lock(&vsock).connection_count(), 0);

    lock(&vsock).resume(&mut manager.event_ops(id).unwrap());
    assert!(!lock(&vsock).is_paused());
    // The guest's packet was served by `resume` itself.
    assert_eq!(driver.tx.used().len(), 1);
    let mut packets = driver.received();
    packets.extend(receive(&mut manager, &mut driver, 2 - packets.len()));
    assert_eq!(ops(&packets), [OP_RST, OP_REQUEST]);
    accept(&mut manager, &mut driver, &mut host, &packets[1].0);
    assert_eq!(lock(&vsock).connection_count(), 1);
    settle(&mut manager);
}

/// With no RX buffers, what the host sends waits without the loop spinning, and goes to
/// the guest once it posts buffers.
#[test]
fn rx_without_buffers_waits_without_spinning() {
    let mem = memory();
    let (_dir, uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    manager.add_subscriber(vsock.clone());
    let mut driver = Driver::new(&mem, 0);
    driver.activate(&mut lock(&vsock), VERSION_1);
    manager.run_with_timeout(1000).unwrap();

    // The REQUEST waits for a buffer.
    let mut host = host_connect(&uds, 5000);
    for _ in 0..3 {
        manager.run_with_timeout(50).unwrap();
    }
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    assert!(driver.rx.used().is_empty());
    assert_eq!(lock(&vsock).connection_count(), 1);
    driver.post_rx(1);
    driver.kick_rx();
    let packets = receive(&mut manager, &mut driver, 1);
    let local = accept(&mut manager, &mut driver, &mut host, &packets[0].0);

    // Data waits too: the stream stays readable but is no longer watched for it.
    host.write_all(b"queued").unwrap();
    for _ in 0..3 {
        manager.run_with_timeout(50).unwrap();
    }
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    assert!(driver.received().is_empty());
    // The host closes its side meanwhile: data, then the SHUTDOWN, once buffers arrive.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    driver.post_rx(4);
    driver.kick_rx();
    let packets = receive(&mut manager, &mut driver, 2);
    assert_eq!(ops(&packets), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(packets[0].1, b"queued");
    assert_eq!(packets[1].0.flags, SHUTDOWN_SEND);
    assert_eq!(
        (packets[1].0.src_port, packets[1].0.dst_port),
        (local, 5000)
    );
    settle(&mut manager);

    // The guest still writes to the half-closed host stream, then resets it.
    driver.send(guest_header(OP_RW, 5000, local), b"bye");
    driver.send(guest_header(OP_RST, 5000, local), b"");
    driver.kick_tx();
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(read_exact(&mut host, 3), b"bye");
    assert_closed(&mut host);
    assert_eq!(lock(&vsock).connection_count(), 0);
    settle(&mut manager);
    assert_eq!(lock(&vsock).watched_host.len(), 1);
}

/// Malformed TX chains through the loop: returned, and the loop goes on serving.
#[test]
fn malformed_tx_through_the_loop() {
    let mem = memory();
    let (_dir, _uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    manager.add_subscriber(vsock.clone());
    let mut driver = Driver::new(&mem, 0);
    driver.post_rx(4);
    driver.activate(&mut lock(&vsock), VERSION_1);
    manager.run_with_timeout(1000).unwrap();

    driver.tx.add(&[(10, 0)], |_| {});
    driver
        .tx
        .add(&[(4096, super::super::device::tests::WRITE)], |_| {});
    driver.send(guest_header(OP_RW, 1, 2), b"fine");
    driver.kick_tx();
    assert_eq!(ops(&receive(&mut manager, &mut driver, 1)), [OP_RST]);
    assert_eq!(driver.tx.used().len(), 3);
    settle(&mut manager);
}

/// A host that hangs up while the guest has not answered its REQUEST frees the connection
/// and resets the guest's side; one that sent data with its CONNECT line gets it through
/// once the guest answers.
#[test]
fn host_hang_up_and_early_data_before_the_response() {
    let mem = memory();
    let (_dir, uds, vsock) = new_vsock();
    let vsock = Arc::new(Mutex::new(vsock));
    let mut manager = Loop::new().unwrap();
    manager.add_subscriber(vsock.clone());
    let mut driver = Driver::new(&mem, 0);
    driver.post_rx(8);
    driver.activate(&mut lock(&vsock), VERSION_1);
    manager.run_with_timeout(1000).unwrap();

    let host = host_connect(&uds, 5000);
    let request = receive(&mut manager, &mut driver, 1)[0].0;
    assert_eq!(request.op, OP_REQUEST);
    settle(&mut manager);
    assert_eq!(lock(&vsock).connection_count(), 1);
    drop(host);
    let packets = receive(&mut manager, &mut driver, 1);
    assert_eq!(ops(&packets), [OP_RST]);
    assert_eq!(
        (packets[0].0.src_port, packets[0].0.dst_port),
        (request.src_port, 5000)
    );
    assert_eq!(lock(&vsock).connection_count(), 0);
    settle(&mut manager);
    assert_eq!(lock(&vsock).watched_host.len(), 1);

    // Bytes right after the CONNECT line stay in the stream until the RESPONSE.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 5001\nearly bytes").unwrap();
    let request = receive(&mut manager, &mut driver, 1)[0].0;
    settle(&mut manager);
    assert!(driver.received().is_empty());
    let local = accept(&mut manager, &mut driver, &mut host, &request);
    let packets = receive(&mut manager, &mut driver, 1);
    assert_eq!(ops(&packets), [OP_RW]);
    assert_eq!(packets[0].1, b"early bytes");
    assert_eq!(
        (packets[0].0.src_port, packets[0].0.dst_port),
        (local, 5001)
    );
    settle(&mut manager);
}
