//! The optional configuration file: `KEY=VALUE` lines (the same names as the
//! environment variables), loaded before flags are parsed. The environment
//! wins over the file, and flags win over both, as clap's `env` fallbacks do.

use std::path::PathBuf;

/// Finds `--config <path>` / `--config=<path>` in the arguments, else
/// `NEXUS_CONFIG`, and loads that file into the environment. A missing or
/// unreadable file named explicitly is an error worth stopping for.
pub fn load_from_args() -> Result<Option<PathBuf>, String> {
    let Some(path) = config_path(std::env::args().collect()) else {
        return Ok(None);
    };
    dotenvy::from_path(&path).map_err(|error| format!("config file {}: {error}", path.display()))?;
    Ok(Some(path))
}

fn config_path(args: Vec<String>) -> Option<PathBuf> {
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("NEXUS_CONFIG").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::config_path;

    #[test]
    fn config_flag_is_found_in_either_form() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        assert_eq!(config_path(args(&["bin", "--config", "a.env"])), Some("a.env".into()));
        assert_eq!(
            config_path(args(&["bin", "--listen", "x", "--config=b.env"])),
            Some("b.env".into())
        );
    }
}
