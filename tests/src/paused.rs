//! An exchange (see [`crate::upstream`]) that stops half-way in both directions
//! until the test lets it go on, so the test can reload or stop the proxy while
//! the tunnel is provably in the middle of a transfer.

use std::{
    io::{self, Write},
    net::{Shutdown, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
};

use crate::{
    pattern,
    upstream::{ClientResult, Header},
    Mode, IO_TIMEOUT,
};

/// A [`Mode::Concurrent`] exchange whose client has sent half of its bytes and
/// read half of the server's, and waits for [`PausedExchange::finish`].
pub struct PausedExchange {
    header: Header,
    resume: Vec<mpsc::Sender<()>>,
    sender: JoinHandle<io::Result<()>>,
    receiver: JoinHandle<Result<u64, String>>,
}

impl PausedExchange {
    /// Starts the exchange on `stream`, an open tunnel whose 200 has been read,
    /// and returns once both directions have reached their half-way point (up to
    /// [`IO_TIMEOUT`]).
    pub fn start(stream: TcpStream, header: Header) -> Self {
        assert_eq!(
            header.mode,
            Mode::Concurrent,
            "a paused exchange is concurrent"
        );
        let (reached, halfway) = mpsc::channel();
        let (resume_sender, wait_sender) = mpsc::channel();
        let (resume_receiver, wait_receiver) = mpsc::channel();
        let mut writer = stream.try_clone().expect("clone tunnel socket");
        let up_reached = reached.clone();
        let sender = std::thread::spawn(move || {
            writer.write_all(&header.encode())?;
            pattern::send_range(&mut writer, header.seed, 0, header.up / 2)?;
            pause(&up_reached, &wait_sender);
            pattern::send_range(&mut writer, header.seed, header.up / 2, header.up)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut reader = stream;
        let receiver = std::thread::spawn(move || {
            let seed = header.seed + 1;
            let first = pattern::receive_range(&mut reader, seed, 0, Some(header.down / 2))?;
            pause(&reached, &wait_receiver);
            let rest = pattern::receive_range(&mut reader, seed, first, None)?;
            Ok(first + rest)
        });
        for _ in 0..2 {
            halfway
                .recv_timeout(IO_TIMEOUT)
                .expect("the exchange did not reach half-way");
        }
        Self {
            header,
            resume: vec![resume_sender, resume_receiver],
            sender,
            receiver,
        }
    }

    /// Lets both directions go on and returns what the client received.
    pub fn finish(self) -> ClientResult {
        for resume in &self.resume {
            let _ = resume.send(());
        }
        self.sender
            .join()
            .expect("paused exchange sender")
            .unwrap_or_else(|err| panic!("sending {:?}: {err}", self.header));
        ClientResult {
            received: self.receiver.join().expect("paused exchange receiver"),
        }
    }
}

/// Says the half-way point is reached and waits (bounded) to go on.
fn pause(reached: &mpsc::Sender<()>, resume: &mpsc::Receiver<()>) {
    let _ = reached.send(());
    let _ = resume.recv_timeout(IO_TIMEOUT);
}
