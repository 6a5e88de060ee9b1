//! An echo server in a process of its own, for load tests that hold more
//! connections than the test process's RLIMIT_NOFILE has room for on both ends
//! (see `spliced_tests::echo::EchoProcess`).
//!
//! One epoll thread: listens on 127.0.0.1 (port 0, backlog 4096), prints
//! `listening on ADDR` on stdout, echoes every byte back on every connection
//! (reading no more from a connection while its echo waits for room), closes a
//! connection once its client has closed and all was echoed, and exits when its
//! stdin closes, i.e. when the test that started it is gone.

use std::{
    collections::HashMap,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
};

use socket2::{Domain, Socket, Type};

/// A connection and the bytes whose echo is still to be written.
struct Connection {
    stream: TcpStream,
    pending: Vec<u8>,
    closed_by_client: bool,
}

const STDIN: u64 = u64::MAX;
const LISTENER: u64 = u64::MAX - 1;

fn epoll_ctl(epoll: i32, op: i32, fd: i32, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl with valid descriptors and an event we own.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    let listener: TcpListener = socket.into();
    // SAFETY: plain system call.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    let readable = libc::EPOLLIN as u32;
    epoll_ctl(epoll, libc::EPOLL_CTL_ADD, 0, readable, STDIN)?;
    epoll_ctl(
        epoll,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        readable,
        LISTENER,
    )?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut connections: HashMap<u64, Connection> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer holds `events.len()` entries.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for event in &events[..n as usize] {
            let (token, flags) = (event.u64, event.events);
            match token {
                STDIN => {
                    if matches!(io::stdin().read(&mut buf), Ok(0) | Err(_)) {
                        return Ok(());
                    }
                }
                // Until it would block; out of descriptors and the like, the
                // next event retries.
                LISTENER => {
                    while let Ok((stream, _)) = listener.accept() {
                        stream.set_nonblocking(true)?;
                        let _ = stream.set_nodelay(true);
                        let fd = stream.as_raw_fd();
                        epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, readable, fd as u64)?;
                        connections.insert(
                            fd as u64,
                            Connection {
                                stream,
                                pending: Vec::new(),
                                closed_by_client: false,
                            },
                        );
                    }
                }
                token => {
                    let Some(connection) = connections.get_mut(&token) else {
                        continue;
                    };
                    if serve(connection, flags, &mut buf, epoll).is_err()
                        || (connection.closed_by_client && connection.pending.is_empty())
                    {
                        // Closing the descriptor also removes it from the epoll set.
                        connections.remove(&token);
                    }
                }
            }
        }
    }
}

/// Handles one readiness event of a connection; an error means drop it.
fn serve(connection: &mut Connection, flags: u32, buf: &mut [u8], epoll: i32) -> io::Result<()> {
    let fd = connection.stream.as_raw_fd();
    if !connection.pending.is_empty() {
        if flags & (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
            return Ok(());
        }
        match connection.stream.write(&connection.pending) {
            Ok(n) => {
                connection.pending.drain(..n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
        if connection.pending.is_empty() && !connection.closed_by_client {
            epoll_ctl(
                epoll,
                libc::EPOLL_CTL_MOD,
                fd,
                libc::EPOLLIN as u32,
                fd as u64,
            )?;
        }
        return Ok(());
    }
    let n = match connection.stream.read(buf) {
        Ok(0) => {
            connection.closed_by_client = true;
            return Ok(());
        }
        Ok(n) => n,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(err) => return Err(err),
    };
    let written = match connection.stream.write(&buf[..n]) {
        Ok(m) => m,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
        Err(err) => return Err(err),
    };
    if written < n {
        // No more reading until the echo is out: the client's window stops it.
        connection.pending.extend_from_slice(&buf[written..n]);
        epoll_ctl(
            epoll,
            libc::EPOLL_CTL_MOD,
            fd,
            libc::EPOLLOUT as u32,
            fd as u64,
        )?;
    }
    Ok(())
}
