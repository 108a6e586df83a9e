defmodule Ottla.TestingFaultsTest do
  # Ottla.Testing's faults on the embedded cluster, each shown through Ottla's public API.
  use ExUnit.Case, async: true

  import Ottla.TestSupport, only: [wait_until: 3, conn_name: 0]

  defp cluster!(brokers \\ 1) do
    {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: brokers)
    endpoints
  end

  defp values(endpoints, topic, partition \\ 0) do
    {:ok, _, messages} = Ottla.fetch(endpoints, topic, partition: partition)
    Enum.map(messages, & &1.value)
  end

  test "a broker down fails produce calls until it is up again" do
    endpoints = cluster!()
    :ok = Ottla.create_topic(endpoints, "t")
    :ok = Ottla.produce(endpoints, "t", "before")

    assert :ok = Ottla.Testing.broker_down(endpoints, 1)

    assert {:error, %Ottla.Error{}, [{"during", %Ottla.Error{}}]} =
             Ottla.produce(endpoints, "t", "during", timeout: 1_500)

    assert :ok = Ottla.Testing.broker_up(endpoints, 1)
    assert :ok = Ottla.produce(endpoints, "t", "after")
    assert "after" in values(endpoints, "t")
  end

  test "a request error reaches the app when it is not retriable, and only the next requests" do
    endpoints = cluster!()
    :ok = Ottla.create_topic(endpoints, "t")

    assert :ok = Ottla.Testing.fail_requests(endpoints, :produce, :topic_authorization_failed, 1)

    assert {:error, %Ottla.Error{code: :topic_authorization_failed}, [_]} =
             Ottla.produce(endpoints, "t", "refused")

    assert :ok = Ottla.produce(endpoints, "t", "accepted")
    assert values(endpoints, "t") == ["accepted"]
  end

  test "latency delays a broker's answers" do
    endpoints = cluster!()
    :ok = Ottla.create_topic(endpoints, "t")
    :ok = Ottla.produce(endpoints, "t", "warm")

    assert :ok = Ottla.Testing.set_latency(endpoints, 1, 400)
    {took, :ok} = :timer.tc(fn -> Ottla.produce(endpoints, "t", "slow") end)
    assert took >= 400_000

    assert :ok = Ottla.Testing.set_latency(endpoints, 1, 0)
  end

  test "a moved leader takes the partition's traffic: its old broker's outage no longer matters" do
    endpoints = cluster!(2)
    :ok = Ottla.create_topic(endpoints, "t", replicas: 2)

    assert :ok = Ottla.Testing.move_leader(endpoints, "t", 0, 2)
    :ok = Ottla.Testing.broker_down(endpoints, 1)
    assert :ok = Ottla.produce(endpoints, "t", "led by 2", timeout: 10_000)

    assert :ok = Ottla.Testing.move_leader(endpoints, "t", 0, 1)

    assert {:error, _, [_]} = Ottla.produce(endpoints, "t", "led by 1, down", timeout: 1_500)

    :ok = Ottla.Testing.broker_up(endpoints, 1)
    assert :ok = Ottla.produce(endpoints, "t", "led by 1, up", timeout: 10_000)
  end

  test "a group consumer's commits go on through a moved coordinator and failed commit requests" do
    endpoints = cluster!(2)
    :ok = Ottla.create_topic(endpoints, "orders", replicas: 2)
    :ok = Ottla.Testing.move_leader(endpoints, "orders", 0, 2)
    group = "g-#{System.unique_integer([:positive])}"
    conn = conn_name()

    # The first commits are refused (retriable): the consumer tries them again.
    :ok = Ottla.Testing.fail_requests(endpoints, :offset_commit, :coordinator_load_in_progress, 3)

    start_supervised!(
      {Ottla.Supervisor,
       connection: conn,
       endpoints: endpoints,
       group_consumer: [
         group: group,
         topics: ["orders"],
         handler: Ottla.TestHandler,
         handler_init_args: %{pid: self()},
         begin_offset: :earliest
       ]}
    )

    :ok = Ottla.produce(endpoints, "orders", ["a", "b"])
    assert_receive {:batch, _, "orders", 0, _}, 10_000

    committed = fn ->
      case Ottla.committed_offsets(endpoints, group, "orders", timeout: 2_000) do
        {:ok, offsets} -> Map.new(offsets)
        {:error, _} -> %{}
      end
    end

    wait_until(fn -> committed.() == %{0 => 2} end, 15_000, "the commit of offset 2")

    # The coordinator moves to broker 2, and broker 1 goes down: commits still land.
    :ok = Ottla.Testing.move_coordinator(endpoints, group, 2)
    :ok = Ottla.Testing.broker_down(endpoints, 1)
    :ok = Ottla.produce(endpoints, "orders", ["c"], timeout: 10_000)
    wait_until(fn -> committed.() == %{0 => 3} end, 20_000, "the commit of offset 3")
  end

  test "bad arguments raise ArgumentError naming them" do
    endpoints = cluster!(2)

    for {call, name} <- [
          {fn -> Ottla.Testing.broker_down(endpoints, 3) end, "broker"},
          {fn -> Ottla.Testing.broker_down(endpoints, 0) end, ":broker"},
          {fn -> Ottla.Testing.broker_up(endpoints, "1") end, ":broker"},
          {fn -> Ottla.Testing.set_latency(endpoints, 1, -5) end, ":ms"},
          {fn -> Ottla.Testing.fail_requests(endpoints, :nope, :request_timed_out) end, "api"},
          {fn -> Ottla.Testing.fail_requests(endpoints, :produce, :no_such_error) end, "error"},
          {fn -> Ottla.Testing.fail_requests(endpoints, :produce, "x") end, "error"},
          {fn -> Ottla.Testing.fail_requests(endpoints, :produce, :request_timed_out, 0) end,
           ":count"},
          {fn -> Ottla.Testing.move_leader(endpoints, "t\0", 0, 1) end, "topic"},
          {fn -> Ottla.Testing.move_leader(endpoints, "t", -1, 1) end, ":partition"},
          {fn -> Ottla.Testing.move_coordinator(endpoints, :g, 1) end, "group"},
          {fn -> Ottla.Testing.broker_down([{"127.0.0.1", 1}], 1) end, "endpoints"},
          {fn -> Ottla.Testing.broker_down(:nope, 1) end, "endpoints"}
        ] do
      error = assert_raise ArgumentError, call
      assert error.message =~ name, "expected #{inspect(name)} in: #{error.message}"
    end
  end
end
