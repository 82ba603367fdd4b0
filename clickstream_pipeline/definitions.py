"""The code location's single entry point: ``defs``."""

import dagster as dg

from clickstream_pipeline.alerts import (
    AlertResource,
    load_failure_alert_sensor,
    slow_load_alert_sensor,
    stream_freshness_alert_sensor,
)
from clickstream_pipeline.assets import raw_events, warehouse_events
from clickstream_pipeline.jobs import load_partitions_job
from clickstream_pipeline.resources import RegistryResource, S3StorageResource, WarehouseResource
from clickstream_pipeline.sensors import (
    DiscoveryResource,
    registry_sync_sensor,
    s3_discovery_sensor,
)

defs = dg.Definitions(
    assets=[raw_events, warehouse_events],
    jobs=[load_partitions_job],
    sensors=[
        registry_sync_sensor,
        s3_discovery_sensor,
        load_failure_alert_sensor,
        slow_load_alert_sensor,
        stream_freshness_alert_sensor,
    ],
    resources={
        "s3": S3StorageResource(),
        "warehouse": WarehouseResource(),
        "registry": RegistryResource(),
        "discovery": DiscoveryResource(),
        "alerts": AlertResource(),
    },
)
