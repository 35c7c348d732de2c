"""A Nexus client in Python, generated from proto/ with grpcio-tools.

Starts a workflow, watches it, drops the stream after a few events (as a
network blip would), resumes from the last cursor it saw, and prints every
event's cursor and kind, then the outcome. Exits 0 when the run completed,
1 when it failed, 3 when it was cancelled (like `nexus watch`).

    ./examples/python/run.sh --endpoint 127.0.0.1:50051 [--token T] [--drop-after 5]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))

import grpc  # noqa: E402
from nexus.v1 import workflow_pb2, workflow_pb2_grpc  # noqa: E402

EXIT = {"completed": 0, "failed": 1, "cancelled": 3}


def watch(stub, workflow_id, after_cursor, metadata, limit=None):
    """Yields events after `after_cursor`; stops after `limit` of them."""
    request = workflow_pb2.WatchWorkflowRequest(workflow_id=workflow_id, after_cursor=after_cursor)
    stream = stub.WatchWorkflow(request, metadata=metadata)
    for count, event in enumerate(stream, start=1):
        yield event
        if limit is not None and count >= limit:
            stream.cancel()  # the blip: this stream is gone
            return


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:50051")
    parser.add_argument("--token", default=os.environ.get("NEXUS_API_TOKEN", ""))
    parser.add_argument("--name", default="Python client plan")
    parser.add_argument("--drop-after", type=int, default=5, help="events before the simulated disconnect")
    args = parser.parse_args()

    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.endpoint) as channel:
        stub = workflow_pb2_grpc.WorkflowServiceStub(channel)
        plan = workflow_pb2.ProjectPlan(
            name=args.name,
            description="A booking app for a climbing gym: memberships, classes, payments.",
            fields={"team": "3 developers", "deadline": "6 months"},
        )
        started = stub.StartWorkflow(workflow_pb2.StartWorkflowRequest(plan=plan), metadata=metadata)
        print(f"started {started.workflow_id}", flush=True)

        cursor, outcome = "", None
        for event in watch(stub, started.workflow_id, cursor, metadata, limit=args.drop_after):
            cursor = event.cursor
            print(f"event {event.cursor} {event.WhichOneof('kind')}", flush=True)
        print(f"disconnected; resuming after {cursor}", flush=True)
        for event in watch(stub, started.workflow_id, cursor, metadata):
            kind = event.WhichOneof("kind")
            print(f"event {event.cursor} {kind}", flush=True)
            if kind in EXIT:
                outcome = kind

        workflow = stub.GetWorkflow(
            workflow_pb2.GetWorkflowRequest(workflow_id=started.workflow_id), metadata=metadata
        )
        print(f"outcome {outcome}; score {workflow.rating.score}; cost ${workflow.total_usage.cost_usd:.4f}")
        return EXIT.get(outcome, 1)


if __name__ == "__main__":
    sys.exit(main())
