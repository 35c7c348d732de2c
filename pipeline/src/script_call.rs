//! A Lua script call (`EVALSHA`) written straight into one command buffer.
//!
//! redis-rs's `ScriptInvocation` keeps every argument in a `Vec` of its own
//! and copies them all into the command when it is sent. A worker's settle
//! passes about 30 arguments, the phase's output and encoded events among
//! them, so that was 30 allocations and a second copy of every byte, per
//! phase. Here the keys are given first, as `EVALSHA` lays them out, and each
//! argument is written once, where it will be sent from. The worker's hot
//! scripts use it; the orchestrator's, called once per run or per request,
//! still go through `ScriptInvocation`.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

/// Arguments and bytes a command is sized for when it starts (a settle has
/// about 35 arguments and, with a short output, under 2 KB of them; a longer
/// output grows it once or twice).
const ARGS_EXPECTED: usize = 40;
const BYTES_EXPECTED: usize = 2048;

/// One call of `script` with its keys; arguments follow with [`ScriptCall::arg`].
pub struct ScriptCall<'a> {
    script: &'a Script,
    command: Cmd,
}

impl<'a> ScriptCall<'a> {
    pub fn new<K: ToRedisArgs>(script: &'a Script, keys: &[K]) -> Self {
        // Room for a settle's arguments from the start: growing the buffer
        // as they arrive was eight reallocations per call.
        let mut command = Cmd::with_capacity(ARGS_EXPECTED, BYTES_EXPECTED);
        command.arg("EVALSHA");
        command.arg(script.get_hash()).arg(keys.len()).arg(keys);
        Self { script, command }
    }

    /// Appends an argument (`ARGV[i]`, in order; a slice is one per item).
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.command.arg(arg);
        self
    }

    /// Runs the script by its hash; a Redis that does not have it (new,
    /// restarted, or flushed) is given it, and the call sent again.
    pub async fn invoke_async<T: FromRedisValue>(&self, conn: &mut impl ConnectionLike) -> RedisResult<T> {
        match self.command.query_async(conn).await {
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.command.query_async(conn).await
            }
            result => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_first_and_are_counted() {
        let script = Script::new("return 1");
        let mut call = ScriptCall::new(&script, &["k1", "k2"]);
        call.arg("a").arg(&["b", "c"][..]).arg(7);
        let args: Vec<Vec<u8>> = call
            .command
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => b"<not simple>".to_vec(),
            })
            .collect();
        let expected: Vec<&[u8]> = vec![
            b"EVALSHA",
            script.get_hash().as_bytes(),
            b"2",
            b"k1",
            b"k2",
            b"a",
            b"b",
            b"c",
            b"7",
        ];
        assert_eq!(args, expected);
    }
}
