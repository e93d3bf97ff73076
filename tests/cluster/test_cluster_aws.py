"""What `ray up` and the head's autoscaler ask AWS for, from Ray 2.60's own AWS code under botocore's
Stubber (as Ray's own tests in python/ray/tests/aws/ do): every request is answered by the test, in the
order Ray must make it, and nothing leaves this machine. Checked:

- `ray up`'s bootstrap on a new account (Ray's `_bootstrap_config`: instance types, the head's IAM role
  and instance profile with Ray's full-access policies, key pair, subnets, security group and its rules),
  the instance profile on the head only, `resolve:ssm:` image ids passed to EC2 untouched;
- the same with the shipped least-privilege head role named in cluster.yaml: no IAM call at all;
- the head launched, stopped by `ray down` and reused by the next `ray up`; a worker launched by
  autoscaler v2 from the bootstrap config the head pinned to its AMI, stopped when idle, reused, and
  terminated when stopping is off;
- every request AWS would authorize for those calls is allowed by sweeps/cluster/launcher-policy.json
  (your user, with the shipped head role) and sweeps/cluster/head-policy.json (the head's role), each of
  their actions is used, and README "Permissions" names exactly these actions. The requests implied by a
  call follow AWS's documented rules (RunInstances: the instance with its tags and type, the image,
  subnet, security group, key pair, network interface and volume; tags given at launch need
  ec2:CreateTags with ec2:CreateAction; an instance profile needs iam:PassRole on its role; a
  `resolve:ssm:` image needs ssm:GetParameters); the policies are evaluated with a small evaluator of
  the parts they use (Allow statements, actions, resource ARNs, StringEquals). Only a real account shows
  that AWS agrees.
"""
from __future__ import annotations

import copy
import datetime
import fnmatch
import json
import os
import re
import types
from pathlib import Path

import pytest
import yaml
from botocore.stub import ANY, Stubber

from tests.helpers import launcher as cl
from tests.helpers.cluster import LocalSSH, load_cluster, local_shell_env, run_like_ray
from tests.helpers.sweep import ROOT

REGION = "us-west-2"
POLICIES = ROOT / "sweeps" / "cluster"
VPC = "vpc-0a1b2c3d4e5f60718"
SG = "sg-0123456789abcdef0"
SUBNETS = {"us-west-2a": "subnet-0aaaaaaaaaaaaaaa1", "us-west-2b": "subnet-0bbbbbbbbbbbbbbb2",
           "us-west-2c": "subnet-0ccccccccccccccc3"}
PRIVATE_SUBNET = "subnet-0ddddddddddddddd4"              # no public IPs: Ray leaves it out
HEAD_ID, WORKER_ID = "i-0aaaaaaaaaaaaaaa0", "i-0bbbbbbbbbbbbbbb0"
AMI = "ami-0123456789abcdef0"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
ACCOUNT = "123456789012"


# ---- the stubbed AWS ------------------------------------------------------------------------------
class AWS:
    """Stubbers on the boto3 clients Ray's AWS code uses (Ray caches one per service, region and retry
    count), answering in order; every call's parameters as Ray sent them are kept in `calls`."""

    def __init__(self):
        from ray.autoscaler._private.aws.utils import resource_cache
        from ray.autoscaler._private.constants import BOTO_MAX_RETRIES
        self.clients = {
            "iam": resource_cache("iam", REGION).meta.client,
            "ec2": resource_cache("ec2", REGION).meta.client,                          # bootstrap_aws
            "ec2-provider": resource_cache("ec2", REGION, BOTO_MAX_RETRIES).meta.client,  # instance types, AWSNodeProvider
            "ec2-launch": resource_cache("ec2", REGION, 0).meta.client,                # create_instances (fail fast)
        }
        self.stubs = {k: Stubber(c) for k, c in self.clients.items()}
        self.calls: list[tuple[str, str, dict]] = []
        self._handlers = []
        for client in set(self.clients.values()):
            handler = self._record(client.meta.service_model.endpoint_prefix)
            client.meta.events.register("provide-client-params.*.*", handler)
            self._handlers.append((client, handler))

    def _record(self, service):
        def handler(params, model, **kw):
            self.calls.append((service, model.name, copy.deepcopy(params)))
        return handler

    def expect(self, client: str, method: str, response: dict, params=None):
        self.stubs[client].add_response(method, response, params)

    def refuse(self, client: str, method: str, code: str, params=None):
        self.stubs[client].add_client_error(method, service_error_code=code, http_status_code=404,
                                            expected_params=params)

    def ops(self, since: int = 0) -> list[str]:
        return [f"{service}:{op}" for service, op, _ in self.calls[since:]]

    def __enter__(self):
        for s in self.stubs.values():
            s.activate()
        return self

    def __exit__(self, exc_type, *rest):
        for s in self.stubs.values():
            s.deactivate()
        for client, handler in self._handlers:
            client.meta.events.unregister("provide-client-params.*.*", handler)
        if exc_type is None:
            for name, s in self.stubs.items():
                s.assert_no_pending_responses()


@pytest.fixture
def aws(tmp_path, monkeypatch, cluster_extra):
    """`ray up`'s environment (tests/helpers/launcher.py: a HOME of its own, for the key file too; AWS
    credentials that reach nothing) and the stubs. Ray waits 15 s twice for IAM to propagate after it
    creates the role: those waits are recorded instead of slept."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import node_provider
    aws_config._get_subnets_or_die.cache_clear()
    slept = []
    monkeypatch.setattr(aws_config, "time", types.SimpleNamespace(sleep=slept.append))
    # AWSNodeProvider.set_node_tags gathers the tags of concurrent callers for 1 s; here there is one
    monkeypatch.setattr(node_provider, "TAG_BATCH_DELAY", 0)
    with cl.launcher_env(tmp_path) as laptop, AWS() as stubs:
        stubs.laptop, stubs.slept = laptop, slept
        yield stubs
    aws_config._get_subnets_or_die.cache_clear()


# ---- answers ------------------------------------------------------------------------------------
def instance_types() -> dict:
    def t(name, vcpus, mib, gpus=0):
        out = {"InstanceType": name, "VCpuInfo": {"DefaultVCpus": vcpus}, "MemoryInfo": {"SizeInMiB": mib}}
        if gpus:
            out["GpuInfo"] = {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": gpus,
                                        "MemoryInfo": {"SizeInMiB": 24576}}]}
        return out
    return {"InstanceTypes": [t("m5.2xlarge", 8, 32768), t("g5.xlarge", 4, 16384, 1), t("g5.12xlarge", 48, 196608, 4)]}


def subnet(subnet_id: str, az: str, public: bool = True) -> dict:
    return {"SubnetId": subnet_id, "VpcId": VPC, "AvailabilityZone": az, "State": "available",
            "MapPublicIpOnLaunch": public, "CidrBlock": "10.0.0.0/20"}


def security_group(group_id: str, name: str, rules: list) -> dict:
    return {"GroupId": group_id, "GroupName": name, "VpcId": VPC, "Description": "-", "OwnerId": ACCOUNT,
            "IpPermissions": rules}


# What Ray must open, written out here: all traffic between the cluster's nodes, SSH from anywhere
# (cluster.yaml says how to narrow it), nothing else.
RULES = [{"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": SG}]},
         {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]


def instance(instance_id: str, state: str, tags: dict, ip: str) -> dict:
    return {"InstanceId": instance_id, "State": {"Name": state, "Code": 16 if state == "running" else 80},
            "StateReason": {"Code": state, "Message": state}, "PrivateIpAddress": ip, "InstanceType": "m5.2xlarge",
            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def reservation(*instances) -> dict:
    return {"Reservations": [{"ReservationId": "r-0123", "OwnerId": ACCOUNT, "Instances": list(instances)}]}


def run_response(instance_id: str, ip: str) -> dict:
    return {"ReservationId": "r-0123", "OwnerId": ACCOUNT, "Instances": [instance(instance_id, "pending", {}, ip)]}


def expect_bootstrap_network(aws: AWS) -> None:
    """Key pair, subnets, security group: what `ray up` does on an account that has none of them."""
    aws.expect("ec2", "describe_key_pairs", {"KeyPairs": []},
               {"Filters": [{"Name": "key-name", "Values": ["ray-autoscaler_us-west-2"]}]})
    aws.expect("ec2", "create_key_pair", {"KeyName": "ray-autoscaler_us-west-2", "KeyFingerprint": "00",
                                          "KeyMaterial": "-----BEGIN RSA PRIVATE KEY-----\n(test)\n", "KeyPairId": "key-0"},
               {"KeyName": "ray-autoscaler_us-west-2"})
    aws.expect("ec2", "describe_subnets", {"Subnets": [subnet(PRIVATE_SUBNET, "us-west-2a", public=False)]
                                           + [subnet(s, az) for az, s in SUBNETS.items()]}, {})
    aws.expect("ec2", "describe_subnets", {"Subnets": [subnet(SUBNETS["us-west-2a"], "us-west-2a")]},
               {"Filters": [{"Name": "subnet-id", "Values": [SUBNETS["us-west-2a"]]}]})
    default = security_group("sg-0default00000000", "default", [])
    aws.expect("ec2", "describe_security_groups", {"SecurityGroups": [default]},
               {"Filters": [{"Name": "vpc-id", "Values": [VPC]}]})
    aws.expect("ec2", "create_security_group", {"GroupId": SG},
               {"Description": ANY, "GroupName": "ray-autoscaler-capsweep", "VpcId": VPC, "TagSpecifications": ANY})
    aws.expect("ec2", "describe_security_groups",
               {"SecurityGroups": [default, security_group(SG, "ray-autoscaler-capsweep", [])]},
               {"Filters": [{"Name": "vpc-id", "Values": [VPC]}]})
    aws.expect("ec2", "authorize_security_group_ingress", {"Return": True}, {"GroupId": SG, "IpPermissions": RULES})
    aws.expect("ec2", "describe_security_groups",
               {"SecurityGroups": [security_group(SG, "ray-autoscaler-capsweep", RULES)]}, {"GroupIds": [SG]})


def expect_ray_role(aws: AWS) -> str:
    """Ray's default head role on an account that has none: profile, role, two managed policies."""
    name = "ray-autoscaler-v1"
    arn = f"arn:aws:iam::{ACCOUNT}:instance-profile/{name}"
    role = {"Path": "/", "RoleName": name, "RoleId": "AROA0123456789ABCDEF", "Arn": f"arn:aws:iam::{ACCOUNT}:role/{name}", "CreateDate": NOW}
    profile = {"Path": "/", "InstanceProfileName": name, "InstanceProfileId": "AIPA0123456789ABCDEF", "Arn": arn, "CreateDate": NOW,
               "Roles": []}
    trust = {"Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    aws.refuse("iam", "get_instance_profile", "NoSuchEntity", {"InstanceProfileName": name})
    aws.expect("iam", "create_instance_profile", {"InstanceProfile": profile}, {"InstanceProfileName": name})
    aws.expect("iam", "get_instance_profile", {"InstanceProfile": profile}, {"InstanceProfileName": name})
    aws.refuse("iam", "get_role", "NoSuchEntity", {"RoleName": name})
    aws.expect("iam", "create_role", {"Role": role}, {"RoleName": name, "AssumeRolePolicyDocument": ANY})
    aws.expect("iam", "get_role", {"Role": role}, {"RoleName": name})
    for policy in ("AmazonEC2FullAccess", "AmazonS3FullAccess"):
        aws.expect("iam", "attach_role_policy", {}, {"RoleName": name, "PolicyArn": f"arn:aws:iam::aws:policy/{policy}"})
    aws.expect("iam", "add_role_to_instance_profile", {}, {"InstanceProfileName": name, "RoleName": name})
    # the profile's ARN, read after the change, is fetched again
    aws.expect("iam", "get_instance_profile", {"InstanceProfile": dict(profile, Roles=[role])}, {"InstanceProfileName": name})
    return arn, trust


def bootstrap(cfg: dict) -> dict:
    """`ray up`'s `_bootstrap_config` (prepare, instance types, validate, bootstrap_aws), no cache file."""
    from ray.autoscaler._private.commands import _bootstrap_config
    return _bootstrap_config(copy.deepcopy(cfg), no_config_cache=True)


def shipped_role(cfg: dict) -> dict:
    """cluster.yaml with the head role line its comment offers, uncommented."""
    text = (ROOT / "cluster.yaml").read_text()
    (line,) = re.findall(r"^ +# (IamInstanceProfile: .*)$", text, flags=re.M)
    out = copy.deepcopy(cfg)
    out["available_node_types"]["head"]["node_config"].update(yaml.safe_load(line))
    return out


# ---- bootstrap ----------------------------------------------------------------------------------
def test_bootstrap_on_a_new_account_with_rays_default_role(aws):
    cfg = load_cluster()
    aws.expect("ec2-provider", "describe_instance_types", instance_types(), {})
    profile_arn, _ = expect_ray_role(aws)
    expect_bootstrap_network(aws)
    out = bootstrap(cfg)
    assert aws.slept == [15, 15], "Ray waits for IAM to propagate after creating the profile and the role"
    assert aws.ops() == [
        "ec2:DescribeInstanceTypes", "iam:GetInstanceProfile", "iam:CreateInstanceProfile", "iam:GetInstanceProfile",
        "iam:GetRole", "iam:CreateRole", "iam:GetRole", "iam:AttachRolePolicy", "iam:AttachRolePolicy",
        "iam:AddRoleToInstanceProfile", "iam:GetInstanceProfile", "ec2:DescribeKeyPairs", "ec2:CreateKeyPair", "ec2:DescribeSubnets",
        "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:CreateSecurityGroup", "ec2:DescribeSecurityGroups",
        "ec2:AuthorizeSecurityGroupIngress", "ec2:DescribeSecurityGroups"]
    (create_role,) = [p for s, op, p in aws.calls if op == "CreateRole"]
    assert json.loads(create_role["AssumeRolePolicyDocument"])["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    # the instance profile goes to the head alone, not to workers or to the head's node type
    assert out["head_node"] == {"IamInstanceProfile": {"Arn": profile_arn}}
    types_ = out["available_node_types"]
    assert not any("IamInstanceProfile" in t["node_config"] for t in types_.values())
    for name, t in types_.items():
        nc = t["node_config"]
        assert nc["ImageId"] == cfg["available_node_types"][name]["node_config"]["ImageId"], "resolve:ssm: left alone"
        assert nc["ImageId"].startswith("resolve:ssm:")
        assert nc["SubnetIds"] == list(SUBNETS.values()) and nc["SecurityGroupIds"] == [SG]
        assert nc["KeyName"] == "ray-autoscaler_us-west-2"
    key = Path(out["auth"]["ssh_private_key"])
    assert key == aws.laptop / ".ssh" / "ray-autoscaler_us-west-2.pem" and key.stat().st_mode & 0o777 == 0o600
    # the head offers no CPU to trials whatever AWS reports; the workers' own counts are kept
    assert types_["head"]["resources"] == {"CPU": 0}
    assert types_["gpu_4x_a10g"]["resources"]["CPU"] == 48 and types_["gpu_4x_a10g"]["resources"]["GPU"] == 4
    # the security group opens nothing but SSH from outside (the test's RULES are the expected request)
    (ingress,) = [p for s, op, p in aws.calls if op == "AuthorizeSecurityGroupIngress"]
    outside = [r for r in ingress["IpPermissions"] if r.get("IpRanges")]
    assert [(r["FromPort"], r["ToPort"]) for r in outside] == [(22, 22)]


def test_bootstrap_with_the_shipped_head_role_makes_no_iam_call(aws):
    cfg = shipped_role(load_cluster())
    aws.expect("ec2-provider", "describe_instance_types", instance_types(), {})
    expect_bootstrap_network(aws)
    out = bootstrap(cfg)
    assert not [op for op in aws.ops() if op.startswith("iam:")] and aws.slept == []
    assert out["available_node_types"]["head"]["node_config"]["IamInstanceProfile"] == {"Name": "capsweep-head"}
    assert not any("IamInstanceProfile" in t["node_config"] for n, t in out["available_node_types"].items() if n != "head")


# ---- the cluster's instances ----------------------------------------------------------------------
def _head_launch(config: dict):
    """The head's node config and tags as get_or_create_head_node builds them (Ray's commands.py)."""
    from ray.autoscaler._private.util import hash_launch_conf
    from ray.autoscaler.tags import (NODE_KIND_HEAD, STATUS_UNINITIALIZED, TAG_RAY_LAUNCH_CONFIG, TAG_RAY_NODE_KIND,
                                     TAG_RAY_NODE_NAME, TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)
    node_config = copy.deepcopy(config.get("head_node", {}))
    node_config.update(config["available_node_types"][config["head_node_type"]]["node_config"])
    tags = {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: config["head_node_type"],
            TAG_RAY_LAUNCH_CONFIG: hash_launch_conf(node_config, config["auth"]),
            TAG_RAY_NODE_NAME: f"ray-{config['cluster_name']}-head", TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED}
    return node_config, tags


def _aws_tags(tags: dict, cluster: str = "capsweep") -> dict:
    from ray.autoscaler.tags import TAG_RAY_NODE_NAME
    out = {"ray-cluster-name": cluster, **tags}
    out["Name"] = out.pop(TAG_RAY_NODE_NAME)
    return out


def _launch_tags(params: dict) -> dict:
    (spec,) = params["TagSpecifications"]
    assert spec["ResourceType"] == "instance"
    return {t["Key"]: t["Value"] for t in spec["Tags"]}


def _pinned_bootstrap(config: dict, provider, tmp: Path) -> Path:
    """The bootstrap config `ray up` writes for the head (Ray's _set_up_config_for_head_node), after the
    head's own start command pinned its AMI (run as Ray runs it; the metadata lookup gives AMI)."""
    from ray.autoscaler._private.commands import _set_up_config_for_head_node
    _, remote = _set_up_config_for_head_node(copy.deepcopy(config), provider, no_restart=False)
    home = tmp / "head-home"
    env = local_shell_env(home)
    path = home / "ray_bootstrap_config.yaml"
    path.write_text(Path(remote.name).read_text())
    remote.close()
    key = Path(config["auth"]["ssh_private_key"])              # `ray up` copies it as ~/ray_bootstrap_key.pem
    (home / "ray_bootstrap_key.pem").write_bytes(key.read_bytes())
    (command,) = [c for c in config["head_start_ray_commands"] if "meta-data/ami-id" in c]
    command = re.sub(r"\$\(TOKEN=\$\(curl .*?/latest/meta-data/ami-id\)", f"$(echo {AMI})", command)
    run_like_ray(command, LocalSSH(execute=True, env=env), run_env="auto")
    return path


def _v2_launch(provider, boot: Path, node_type: str) -> None:
    """Autoscaler v2 launching one worker (its NodeProviderAdapter, from the config it reads)."""
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader
    from ray.autoscaler.v2.instance_manager.node_provider import NodeProviderAdapter
    adapter = NodeProviderAdapter(v1_provider=provider, config_reader=FileConfigReader(str(boot), skip_content_hash=True))
    adapter._launch_nodes_by_type(node_type, 1, "req-1")
    errors = adapter.poll_errors()
    assert not errors, [e.__cause__ for e in errors]


def _lifecycle(aws: AWS, cfg: dict, tmp: Path, iam) -> dict:
    """Bootstrap, then everything the cluster does with instances: the head launched, a worker launched
    by v2, stopped when idle and reused, `ray down` stopping the head, the next `ray up` reusing it, and
    both terminated where stopping is off. Returns the calls' ranges: launcher (your user) and head."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    aws.expect("ec2-provider", "describe_instance_types", instance_types(), {})
    iam(aws)
    expect_bootstrap_network(aws)
    config = bootstrap(cfg)
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    head_config, head_tags = _head_launch(config)
    head_aws_tags = _aws_tags(head_tags)
    stopped_filter = [{"Name": "instance-state-name", "Values": ["stopped", "stopping"]},
                      {"Name": "tag:ray-cluster-name", "Values": ["capsweep"]},
                      {"Name": "tag:ray-node-type", "Values": ["head"]},
                      {"Name": "tag:ray-launch-config", "Values": [head_tags["ray-launch-config"]]},
                      {"Name": "tag:ray-user-node-type", "Values": ["head"]}]
    launcher = [(0, len(aws.calls))]

    # `ray up`: no stopped head to reuse, so one is launched
    start = len(aws.calls)
    aws.expect("ec2-provider", "describe_instances", {"Reservations": []}, {"Filters": stopped_filter})
    aws.expect("ec2-launch", "run_instances", run_response(HEAD_ID, "10.0.0.5"))
    provider.create_node(head_config, head_tags, 1)
    launcher.append((start, len(aws.calls)))

    # the head's autoscaler (v2) launches a worker from the bootstrap config, AMI pinned
    head = []
    start = len(aws.calls)
    boot = _pinned_bootstrap(config, provider, tmp)
    laptop_home = os.environ["HOME"]
    os.environ["HOME"] = str(boot.parent)                      # on the head: ~ is the head's home
    head_provider = AWSNodeProvider(json.loads(boot.read_text())["provider"], "capsweep")
    aws.expect("ec2-provider", "describe_instances", {"Reservations": []})
    aws.expect("ec2-launch", "run_instances", run_response(WORKER_ID, "10.0.1.7"))
    _v2_launch(head_provider, boot, "gpu_4x_a10g")
    (worker_run,) = [p for s, op, p in aws.calls[start:] if op == "RunInstances"]
    worker_tags = _launch_tags(worker_run)
    # ... stops it when idle (on-demand, cache_stopped_nodes) ...
    running = reservation(instance(HEAD_ID, "running", head_aws_tags, "10.0.0.5"),
                          instance(WORKER_ID, "running", worker_tags, "10.0.1.7"))
    aws.expect("ec2-provider", "describe_instances", running)
    aws.expect("ec2-provider", "stop_instances", {}, {"InstanceIds": [WORKER_ID]})
    head_provider.non_terminated_nodes({})
    head_provider.terminate_nodes([WORKER_ID])
    # ... and reuses it for the next demand of its type (started, then tagged: one request per tag)
    aws.expect("ec2-provider", "describe_instances", reservation(instance(WORKER_ID, "stopped", worker_tags, "10.0.1.7")))
    aws.expect("ec2-provider", "start_instances", {}, {"InstanceIds": [WORKER_ID]})
    for _ in range(len(worker_tags) - 1):                 # every tag but ray-cluster-name, set again
        aws.expect("ec2-provider", "create_tags", {})
    _v2_launch(head_provider, boot, "gpu_4x_a10g")
    # ... and terminates it where stopping is off
    no_cache = AWSNodeProvider(dict(head_provider.provider_config, cache_stopped_nodes=False), "capsweep")
    aws.expect("ec2-provider", "describe_instances", running)
    aws.expect("ec2-provider", "terminate_instances", {}, {"InstanceIds": [WORKER_ID]})
    no_cache.non_terminated_nodes({})
    no_cache.terminate_nodes([WORKER_ID])
    head.append((start, len(aws.calls)))
    os.environ["HOME"] = laptop_home

    # `ray down` stops the head; the next `ray up` reuses it; `ray down` with stopping off terminates it
    start = len(aws.calls)
    aws.expect("ec2-provider", "describe_instances", reservation(instance(HEAD_ID, "running", head_aws_tags, "10.0.0.5")))
    aws.expect("ec2-provider", "stop_instances", {}, {"InstanceIds": [HEAD_ID]})
    provider.non_terminated_nodes({"ray-node-type": "head"})
    provider.terminate_nodes([HEAD_ID])
    aws.expect("ec2-provider", "describe_instances", reservation(instance(HEAD_ID, "stopped", head_aws_tags, "10.0.0.5")),
               {"Filters": stopped_filter})
    aws.expect("ec2-provider", "start_instances", {}, {"InstanceIds": [HEAD_ID]})
    for _ in range(len(head_tags)):
        aws.expect("ec2-provider", "create_tags", {})
    provider.create_node(head_config, head_tags, 1)
    down = AWSNodeProvider(dict(config["provider"], cache_stopped_nodes=False), "capsweep")
    aws.expect("ec2-provider", "describe_instances", reservation(instance(HEAD_ID, "running", head_aws_tags, "10.0.0.5")))
    aws.expect("ec2-provider", "terminate_instances", {}, {"InstanceIds": [HEAD_ID]})
    down.non_terminated_nodes({"ray-node-type": "head"})
    down.terminate_nodes([HEAD_ID])
    launcher.append((start, len(aws.calls)))
    return {"config": config, "launcher": launcher, "head": head,
            "tags": {HEAD_ID: head_aws_tags, WORKER_ID: worker_tags}}


def test_the_head_gets_its_profile_and_workers_none(aws, tmp_path):
    run = _lifecycle(aws, shipped_role(load_cluster()), tmp_path, iam=lambda a: None)
    launches = [p for s, op, p in aws.calls if op == "RunInstances"]
    head, worker = launches
    assert head["IamInstanceProfile"] == {"Name": "capsweep-head"} and "IamInstanceProfile" not in worker
    assert head["ImageId"].startswith("resolve:ssm:"), "the head's image is resolved by EC2, with your credentials"
    assert worker["ImageId"] == AMI, "the workers run the head's own AMI, pinned in the bootstrap config"
    assert head["InstanceType"] == "m5.2xlarge" and worker["InstanceType"] == "g5.12xlarge"
    assert head["SubnetId"] == worker["SubnetId"] == SUBNETS["us-west-2a"]
    assert head["SecurityGroupIds"] == worker["SecurityGroupIds"] == [SG]
    assert _launch_tags(head)["ray-cluster-name"] == _launch_tags(worker)["ray-cluster-name"] == "capsweep"
    assert _launch_tags(worker)["ray-user-node-type"] == "gpu_4x_a10g"
    assert run["tags"][WORKER_ID]["ray-node-type"] == "worker"


# ---- the permissions --------------------------------------------------------------------------------
def requests(call: tuple, tags: dict) -> list[tuple[str, str, dict]]:
    """The authorization requests AWS makes for one API call: (action, resource, condition context)."""
    service, op, p = call
    action = f"{service}:{op}"
    if op == "RunInstances":
        instance_ctx = {f"aws:RequestTag/{k}": v for k, v in _launch_tags(p).items()}
        instance_ctx["ec2:InstanceType"] = p["InstanceType"]
        out = [(action, "ec2:instance/*", instance_ctx), (action, "ec2:network-interface/*", {}),
               (action, "ec2:volume/*", {}), (action, f"ec2:subnet/{p['SubnetId']}", {}),
               (action, f"ec2:key-pair/{p['KeyName']}", {}), ("ec2:CreateTags", "ec2:instance/*",
                                                             {"ec2:CreateAction": "RunInstances"})]
        out += [(action, f"ec2:security-group/{g}", {}) for g in p["SecurityGroupIds"]]
        if p["ImageId"].startswith("resolve:ssm:"):
            out += [(action, "ec2:image/*", {}),
                    ("ssm:GetParameters", "ssm:parameter" + p["ImageId"][len("resolve:ssm:"):], {})]
        else:
            out += [(action, f"ec2:image/{p['ImageId']}", {})]
        if "IamInstanceProfile" in p:
            profile = p["IamInstanceProfile"].get("Name") or p["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
            out.append(("iam:PassRole", f"iam:role/{profile}", {}))       # the profile holds the role of its name
        return out
    if op == "CreateSecurityGroup":
        return [(action, "ec2:security-group/*", {}),
                ("ec2:CreateTags", "ec2:security-group/*", {"ec2:CreateAction": "CreateSecurityGroup"})]
    if op in ("StartInstances", "StopInstances", "TerminateInstances", "CreateTags"):
        ids = p["InstanceIds"] if "InstanceIds" in p else p["Resources"]
        return [(action, f"ec2:instance/{i}", {"ec2:ResourceTag/ray-cluster-name": tags[i]["ray-cluster-name"]})
                for i in ids]
    return [(action, "*", {})]


def allowed(policy: dict, action: str, resource: str, context: dict) -> bool:
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow" and set(st) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, st
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
            continue
        arns = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if not any(_resource_matches(arn, resource) for arn in arns):
            continue
        conditions = st.get("Condition", {})
        assert set(conditions) <= {"StringEquals"}, conditions
        if all(context.get(k) in ([v] if isinstance(v, str) else v) for k, v in conditions.get("StringEquals", {}).items()):
            return True
    return False


def _resource_matches(arn: str, resource: str) -> bool:
    if arn == "*":
        return True
    parts = arn.split(":", 5)             # arn:aws:SERVICE:REGION:ACCOUNT:RESOURCE
    assert parts[:2] == ["arn", "aws"] and len(parts) == 6, arn
    if resource == "*":
        return False
    service, _, name = resource.partition(":")
    return parts[2] == service and fnmatch.fnmatchcase(name, parts[5])


def _check(policy_file: str, calls: list, tags: dict) -> set[str]:
    policy = json.loads((POLICIES / policy_file).read_text())
    reqs = [r for c in calls for r in requests(c, tags)]
    refused = [r for r in reqs if not allowed(policy, *r)]
    assert not refused, f"{policy_file} refuses: {refused}"
    granted = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    used = {action for action, _, _ in reqs}
    assert granted == used, f"{policy_file}: granted but never used {granted - used}, used but not listed {used - granted}"
    return used


def _calls(run: dict, aws: AWS, who: str) -> list:
    return [c for a, b in run[who] for c in aws.calls[a:b]]


def test_the_policies_allow_exactly_what_ray_asks_for(aws, tmp_path):
    cfg = shipped_role(load_cluster())
    run = _lifecycle(aws, cfg, tmp_path, iam=lambda a: None)
    _check("launcher-policy.json", _calls(run, aws, "launcher"), run["tags"])
    head_used = _check("head-policy.json", _calls(run, aws, "head"), run["tags"])
    assert not any(a.startswith(("iam:", "ssm:")) for a in head_used), "the head passes no role and resolves no parameter"
    # the policies name this cluster and its worker types: a renamed cluster or a new type needs them edited
    head = json.loads((POLICIES / "head-policy.json").read_text())
    (types_,) = [st["Condition"]["StringEquals"]["ec2:InstanceType"] for st in head["Statement"]
                 if "ec2:InstanceType" in st.get("Condition", {}).get("StringEquals", {})]
    assert sorted(types_) == sorted(t["node_config"]["InstanceType"] for n, t in cfg["available_node_types"].items()
                                    if n != cfg["head_node_type"])
    for name in ("head-policy.json", "launcher-policy.json"):
        policy = json.loads((POLICIES / name).read_text())
        named = [v for st in policy["Statement"] for k, v in st.get("Condition", {}).get("StringEquals", {}).items()
                 if k.endswith("/ray-cluster-name")]
        assert named and set(named) == {cfg["cluster_name"]}, name
    # a head whose pin did not happen would ask for ssm:GetParameters, which its role does not grant
    assert not allowed(head, "ssm:GetParameters", "ssm:parameter/aws/service/deeplearning/x", {})
    # nor may the head launch an instance type of its own choosing or touch another cluster's instances
    assert not allowed(head, "ec2:RunInstances", "ec2:instance/*",
                       {"aws:RequestTag/ray-cluster-name": "capsweep", "ec2:InstanceType": "p5.48xlarge"})
    assert not allowed(head, "ec2:TerminateInstances", "ec2:instance/i-1", {"ec2:ResourceTag/ray-cluster-name": "other"})


def test_the_readme_lists_exactly_the_permissions_ray_asks_for(aws, tmp_path):
    """README "Permissions": your user's actions with Ray's default head role (which `ray up` creates),
    and the head role's. Observed here: the default role's lifecycle (with the shipped role, the same
    minus the IAM calls)."""
    run = _lifecycle(aws, load_cluster(), tmp_path, iam=expect_ray_role)
    tags = run["tags"]
    user = {a for c in _calls(run, aws, "launcher") for a, _, _ in requests(c, tags)}
    head = {a for c in _calls(run, aws, "head") for a, _, _ in requests(c, tags)}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Permissions"):]
    section = section[:re.search(r"\n##+ ", section).start()]
    listed = set(re.findall(r"`((?:ec2|iam|ssm):[A-Za-z]+)`", section))
    assert listed == user | head, f"README lists {sorted(listed - user - head)} not asked for, misses {sorted((user | head) - listed)}"
    assert {"iam:CreateRole", "iam:CreateInstanceProfile", "iam:AttachRolePolicy", "iam:PassRole", "ssm:GetParameters"} <= user


def test_ray_down_sees_only_running_instances(aws):
    """Why stopped workers outlive `ray down` (README "Cost while down"): Ray's teardown asks AWS for the
    cluster's pending and running instances only (AWSNodeProvider keeps NodeProvider.nodes_for_teardown)."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    cfg = load_cluster()
    provider = AWSNodeProvider(cfg["provider"], cfg["cluster_name"])
    aws.expect("ec2-provider", "describe_instances", {"Reservations": []}, {"Filters": [
        {"Name": "instance-state-name", "Values": ["pending", "running"]},
        {"Name": "tag:ray-cluster-name", "Values": ["capsweep"]},
        {"Name": "tag:ray-node-type", "Values": ["worker"]}]})
    assert provider.nodes_for_teardown({"ray-node-type": "worker"}) == []
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert ("--filters Name=tag:ray-cluster-name,Values=capsweep Name=tag:ray-node-type,Values=worker "
            "Name=instance-state-name,Values=stopped") in readme.replace("\\ ", "")
