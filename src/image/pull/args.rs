//! The command-line arguments of pulling (`hearth pull`, and what `hearth container run`
//! takes to pull its IMAGE), beside the code they drive as `bench` and `remote` keep theirs.

use clap::ValueEnum;

/// Where and for which platform images are pulled (`hearth pull`, `container run REF`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to this registry (HOST or HOST:PORT). Repeatable. Loopback
    /// registries (localhost, 127.0.0.0/8, ::1) always are.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// The platform to pick from a multi-platform image.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", default_value = "linux/amd64")]
    pub platform: String,
}

impl RegistryArgs {
    /// The pull options these arguments ask for.
    pub fn options(&self, quiet: bool) -> Result<super::PullOptions, super::PullError> {
        Ok(super::PullOptions {
            platform: self.platform.parse()?,
            insecure_registries: self.insecure_registries.clone(),
            quiet,
        })
    }
}

/// `hearth pull` options.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Print only the image's full name.
    #[arg(short, long)]
    pub quiet: bool,

    /// The image: NAME[:TAG][@DIGEST], with docker's defaults (`alpine` is
    /// docker.io/library/alpine:latest).
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// When `container run` contacts the registry (docker's `--pull`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PullPolicyArg {
    /// Pull every time (blobs already cached are not downloaded again).
    Always,
    /// Pull only when the reference has not been pulled before.
    #[default]
    Missing,
    /// Never pull: the image must be in the cache.
    Never,
}

impl From<PullPolicyArg> for super::PullPolicy {
    fn from(arg: PullPolicyArg) -> Self {
        match arg {
            PullPolicyArg::Always => Self::Always,
            PullPolicyArg::Missing => Self::Missing,
            PullPolicyArg::Never => Self::Never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn pull_and_the_pull_policy() {
        let cli = crate::cli::Cli::try_parse_from([
            "hearth",
            "pull",
            "-q",
            "--platform",
            "linux/arm64",
            "--insecure-registry",
            "reg.lan",
            "busybox",
        ])
        .unwrap();
        let Some(crate::cli::Command::Pull(args)) = cli.command else {
            panic!("expected pull");
        };
        assert_eq!(args.reference, "busybox");
        let options = args.registry.options(args.quiet).unwrap();
        assert!(options.quiet);
        assert_eq!(options.platform.to_string(), "linux/arm64");
        assert_eq!(options.insecure_registries, ["reg.lan"]);

        let run = |extra: &[&str]| {
            let mut argv = vec!["hearth", "container", "run"];
            argv.extend_from_slice(extra);
            argv.push("busybox");
            match crate::cli::Cli::try_parse_from(argv).unwrap().command {
                Some(crate::cli::Command::Container(crate::cli::ContainerCommand::Run(args))) => {
                    args
                }
                _ => panic!("expected container run"),
            }
        };
        let args = run(&[]);
        assert_eq!(args.pull, PullPolicyArg::Missing);
        assert_eq!(
            args.registry.options(false).unwrap().platform.to_string(),
            "linux/amd64"
        );
        assert_eq!(run(&["--pull", "never"]).pull, PullPolicyArg::Never);
        assert_eq!(run(&["--pull", "always"]).pull, PullPolicyArg::Always);
        let err = run(&["--platform", "amd64"])
            .registry
            .options(false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid platform \"amd64\": expected OS/ARCH[/VARIANT], e.g. linux/amd64"
        );
        assert!(crate::cli::Cli::try_parse_from([
            "hearth",
            "container",
            "run",
            "--pull",
            "sometimes",
            "x"
        ])
        .is_err());
    }
}
