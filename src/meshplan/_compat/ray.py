"""The Ray Train behaviours meshplan.ray relies on, read from ray 2.60.0 (Ray Train V2, its default).

meshplan.ray puts meshplan's Lightning strategies into the train function of Ray's documentation.
Everything it calls is Ray's public API (``ray.train.get_context``, ``ray.train.torch.get_device``,
``ray.train.lightning``); what no signature shows is how ``prepare_trainer`` tells a Ray strategy
(an ``isinstance`` test against its three classes), what those classes add to Lightning's (the
device and the sampler's world, nothing else), and where ``RayTrainReportCallback`` saves (a
directory per worker). Each has a canary here. Ray is imported only inside these functions: it is
an optional dependency (``pip install meshplan[ray]``).
"""

from __future__ import annotations

from meshplan._compat import Internal, require_source

READ_FROM = "2.60.0"

# What RayDDPStrategy and RayDeepSpeedStrategy define over Lightning's classes (ray 2.60.0): the
# device Ray gives the worker and the sampler's replicas and rank from Ray's world.
RAY_STRATEGY_ADDITIONS = frozenset({"__init__", "root_device", "distributed_sampler_kwargs"})


def accept_in_prepare_trainer(strategy_class: type) -> None:
    """Makes ``ray.train.lightning.prepare_trainer`` accept ``strategy_class`` without deriving from a Ray class.

    ``prepare_trainer`` accepts a strategy that is an instance of RayDDPStrategy, RayFSDPStrategy
    or RayDeepSpeedStrategy (an ``isinstance`` test; ray 2.60.0), and Ray has no tensor-parallel
    strategy. The class is registered as a virtual subclass of RayDDPStrategy (``abc.ABCMeta.register``):
    ``isinstance`` answers yes, and no method of Ray's or of Lightning's DDPStrategy joins the class.
    The registration reaches up the class tree: ``isinstance`` answers yes for Lightning's
    DDPStrategy too, which Lightning asks in ``is_distributed`` (true anyway) and when it lets a
    ``torch.compile``d LightningModule through (``_verify_strategy_supports_compile``).
    """
    from ray.train.lightning import RayDDPStrategy

    RayDDPStrategy.register(strategy_class)


def _check_prepare_trainer_tests_isinstance() -> None:
    import ray.train.lightning as ray_lightning

    require_source(ray_lightning.prepare_trainer, "isinstance(trainer.strategy, cls)", "RayDDPStrategy",
                   "RayLightningEnvironment")

    class Registered:  # a stand-in strategy: prepare_trainer reads only ``trainer.strategy``
        cluster_environment = None

    class Trainer:
        strategy = Registered()

    accept_in_prepare_trainer(Registered)
    trainer = Trainer()
    assert ray_lightning.prepare_trainer(trainer) is trainer, "prepare_trainer no longer returns the trainer it accepts"


def _check_ray_strategies_add_only_device_and_sampler() -> None:
    from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy

    for strategy in (RayDDPStrategy, RayDeepSpeedStrategy):
        defined = {name for name in vars(strategy) if not name.startswith("_") or name == "__init__"}
        added = defined - RAY_STRATEGY_ADDITIONS
        assert not added, f"{strategy.__name__} now also defines {', '.join(sorted(added))}"
        missing = RAY_STRATEGY_ADDITIONS - defined
        assert not missing, f"{strategy.__name__} no longer defines {', '.join(sorted(missing))}"


def _check_report_callback_saves_per_worker() -> None:
    from ray.train.lightning import RayTrainReportCallback

    require_source(RayTrainReportCallback.__init__, "world_rank={ray.train.get_context().get_world_rank()}")
    require_source(RayTrainReportCallback.on_train_epoch_end, "trainer.save_checkpoint(ckpt_path",
                   "Checkpoint.from_directory(tmpdir)", "CHECKPOINT_NAME")


INTERNALS: list[Internal] = [
    Internal("ray", "ray.train.lightning.prepare_trainer (isinstance test of the strategy)",
             "meshplan.ray.RayTensorParallel is registered as a virtual RayDDPStrategy to pass it; Ray has no TP strategy",
             READ_FROM, _check_prepare_trainer_tests_isinstance),
    Internal("ray", "RayDDPStrategy and RayDeepSpeedStrategy over Lightning's classes",
             "meshplan.ray combines them with meshplan.DDP and meshplan.ZeRO, and gives RayTensorParallel Ray's device "
             "itself; a new override of Ray's would be missed there", READ_FROM, _check_ray_strategies_add_only_device_and_sampler),
    Internal("ray", "RayTrainReportCallback (a checkpoint directory per world rank)",
             "meshplan.ray strategies write one checkpoint into rank 0's directory, which Ray's merge of the "
             "reported directories then holds whole", READ_FROM, _check_report_callback_saves_per_worker),
]
