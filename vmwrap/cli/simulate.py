"""`vmwrap simulate`: what per-job VMs, image caching and suspend/resume would do to a workload."""

from __future__ import annotations

import dataclasses

import click


@click.command()
@click.option("--swf", type=click.Path(exists=True, dir_okay=False), help="Batch trace (Standard Workload Format).")
@click.option("--lwf", type=click.Path(exists=True, dir_okay=False), help="Advance reservations (Haizea LWF lines).")
@click.option("--synthetic", "synth", is_flag=True, help="Generate a mix instead of reading traces.")
@click.option("--jobs", default=500, show_default=True, help="Synthetic: batch jobs.")
@click.option("--load", default=0.8, show_default=True, help="Synthetic: batch load (share of the cluster).")
@click.option("--ar-share", default=0.1, show_default=True, help="Synthetic: reservations' share of all work.")
@click.option("--ar-nodes", default="4-16", show_default=True, help="Synthetic: AR size range, e.g. 25-48.")
@click.option("--ar-hours", default=2.0, show_default=True, help="Synthetic: mean AR duration (+-30 min).")
@click.option("--configs", "names", default="novm,novm+suspend,vm+predeployed,vm+noreuse,vm+reuse-uniform,vm+reuse-skewed",
              show_default=True, help="Comma-separated configurations (see --list).")
@click.option("--list", "list_configs", is_flag=True, help="List the configurations and exit.")
@click.option("--images", default=None, help="uniform, skewed or an image-popularity file (NAME SIZE_MB WEIGHT "
              "lines); default: each configuration's own.")
@click.option("--nodes", type=int, default=None, help="Nodes (default 144).")
@click.option("--cache-gb", type=float, default=None, help="Image cache per node (default 20).")
@click.option("--bandwidth", type=float, default=None, help="Image link MB/s (default 10).")
@click.option("--suspend-rate", type=float, default=None, help="Save/restore MB/s of VM memory (default 50).")
@click.option("--migration", type=click.Choice(["nodes", "delay"]), default="nodes", show_default=True,
              help="A resumed job's memory copy holds its new nodes, or only delays it (Haizea's code of June 2008).")
@click.option("--calibrate-from", "ledgers", multiple=True, type=click.Path(dir_okay=False), metavar="LEDGER",
              help="Take boot, save, restore and image-transfer rates from this site's ledger (repeatable).")
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "csv", "json"]), default="text", show_default=True)
@click.option("--plot-dir", type=click.Path(file_okay=False), default=None, help="Write utilization.png and comparison.png here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on the terminal.")
@click.option("--check", is_flag=True, help="Check invariants after every event (slower).")
@click.option("--swf-cancelled", type=click.Choice(["queue", "skip"]), default="queue", show_default=True,
              help="SWF jobs cancelled while waiting: queue them until their user gave up (as HPDC'08), or skip them.")
def simulate(swf, lwf, synth, jobs, load, ar_share, ar_nodes, ar_hours, names, list_configs, images, nodes,
             cache_gb, bandwidth, suspend_rate, migration, ledgers, seed, fmt, plot_dir, quiet, check, swf_cancelled):
    """What per-job VMs, image caching and suspend/resume would do to a workload (trace-driven).

    Prints, per configuration, when the last batch job finishes (and how much later than with no
    reservations and no VMs), utilization, mean wait, mean bounded slowdown, reservations on time or
    rejected, suspensions and image transfers."""
    from ..sim import CONFIGS, Cluster, WorkloadError
    from ..progress import progress
    from ..sim import calibrate, report, workload

    if list_configs:
        for c in CONFIGS.values():   # only what differs from a plain batch cluster, to fit 100 columns
            # "vm" goes without saying where an image transfer is listed
            what = [w for w, on in (("vm", c.vm and c.transfer == "none"), ("suspend", c.suspend)) if on]
            what += [f"{k}={getattr(c, k)}" for k, plain in (
                ("transfer", "none"), ("images", "uniform"), ("backfill", "easy"), ("placement", "any"),
                ("staging", "hold")) if getattr(c, k) != plain and (k != "images" or c.transfer != "none")]
            what += ["prestage"] if c.prestage else []
            what += ["cancel"] if c.cancel else []   # a reservation cancels the batch jobs in its way
            click.echo(f"{c.name:21} {' '.join(what) or 'batch only, no VMs'}")
        return
    unknown = [n for n in names.split(",") if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f"unknown configuration(s) {', '.join(unknown)}; see --list", param_hint="--configs")
    for opt, v in (("--nodes", nodes), ("--cache-gb", cache_gb), ("--bandwidth", bandwidth),
                   ("--suspend-rate", suspend_rate)):
        if v is not None and not v > 0:
            raise click.BadParameter("must be > 0", param_hint=opt)
    base_cluster = Cluster()
    if ledgers:   # the site's own rates; an explicit option below still wins
        try:
            cal = calibrate.calibrate(list(ledgers))
        except WorkloadError as e:
            raise click.ClickException(str(e))
        base_cluster = cal.apply(base_cluster)
        click.echo(cal.describe(), err=True)
    cluster = report.with_nodes(base_cluster, nodes=nodes, bandwidth_mb_s=bandwidth, suspend_mb_s=suspend_rate,
                                cache_mb=cache_gb * 1024 if cache_gb else None)
    cluster = dataclasses.replace(cluster, migration=migration)
    try:
        if synth:
            lo, _, hi = ar_nodes.partition("-")
            try:
                rng = (int(lo), int(hi or lo))
            except ValueError:
                raise click.BadParameter(f"expected LOW-HIGH, got {ar_nodes!r}", param_hint="--ar-nodes")
            js, ars = workload.synthetic(jobs=jobs, nodes=cluster.nodes, load=load, ar_share=ar_share,
                                         ar_nodes=rng, ar_hours=ar_hours, seed=seed)
        elif swf:
            js = workload.read_swf(swf, cluster.nodes, cancelled=swf_cancelled)
            ars = workload.read_lwf(lwf, cluster.nodes) if lwf else []
        else:
            raise click.UsageError("give --swf (and --lwf) or --synthetic")
        if images:
            workload.image_mix(images)   # parse errors now, not after the first configuration
        chosen = [CONFIGS[n] for n in names.split(",")]
        with progress(f"simulating {len(js)} jobs", unit="stages", total=len(chosen) + 1, quiet=quiet) as tell:
            base, results = report.compare(js, ars, chosen, cluster, seed, images, check,
                                           on_done=lambda name: tell(1, stage=f"{name} done"))
    except WorkloadError as e:
        raise click.ClickException(str(e))
    click.echo(report.render(report.rows(base, results), fmt))
    if plot_dir:
        for p in report.plot(base, results, cluster.nodes, plot_dir, jobs=js,
                             paper=report.published(lwf) if swf else None):
            click.echo(f"wrote {p}", err=True)
