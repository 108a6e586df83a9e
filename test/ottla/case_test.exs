defmodule Ottla.CaseTest do
  # Ottla.Case, used as a user's test module would.
  use Ottla.Case, async: true

  test "each test has the cluster's endpoints, a topic of its own, a group and a connection",
       %{endpoints: endpoints, topic: topic, group: group, connection: conn} do
    assert {:ok, topics} = Ottla.list_topics(endpoints)
    assert {topic, 1} in topics
    assert topic =~ "each-test-has"
    assert is_binary(group) and group != topic
    assert is_atom(conn)
  end

  @tag partitions: 3
  test "a group consumer, waited on instead of slept for",
       %{endpoints: endpoints, topic: topic, group: group} do
    conn =
      start_connection!(
        group_consumer: [
          group: group,
          topics: [topic],
          handler: Ottla.TestHandler,
          handler_init_args: %{pid: self()},
          begin_offset: :earliest
        ]
      )

    assert await_assignment(conn) == [{topic, 0}, {topic, 1}, {topic, 2}]
    :ok = Ottla.produce(endpoints, topic, for(i <- 1..30, do: {"k#{i}", "v#{i}"}))
    assert :ok = await_committed(conn, topic)

    assert {:ok, committed} = Ottla.committed_offsets(endpoints, group, topic)
    assert committed |> Enum.map(fn {_, c} -> c || 0 end) |> Enum.sum() == 30
  end

  test "the faults are imported", %{endpoints: endpoints, topic: topic} do
    assert :ok = fail_requests(endpoints, :produce, :topic_authorization_failed, 1)

    assert {:error, %Ottla.Error{code: :topic_authorization_failed}, _} =
             Ottla.produce(endpoints, topic, "x")
  end

  test "a failure shows the state of the test's consumers", %{topic: topic, group: group} do
    conn =
      start_connection!(
        group_consumer: [
          group: group,
          topics: [topic],
          handler: Ottla.TestHandler,
          handler_init_args: %{pid: self()}
        ]
      )

    await_assignment(conn)

    error =
      assert_raise ExUnit.AssertionError, fn ->
        Ottla.Case.__report__(fn -> flunk("the order was not handled") end)
      end

    assert error.message =~ "the order was not handled"
    assert error.message =~ "Ottla consumer #{inspect(conn)}"
    assert error.message =~ ~r"#{topic}/0: generation \d+, backlog 0"
  end

  test "a test that passes is not touched" do
    assert Ottla.Case.__report__(fn -> :fine end) == :fine
  end

  test "start_connection! outside an Ottla.Case test is refused" do
    message =
      Task.async(fn ->
        try do
          Ottla.Case.start_connection!()
        rescue
          e in ArgumentError -> e.message
        end
      end)
      |> Task.await()

    assert message =~ "uses Ottla.Case"
  end

  test "bad options are refused when the module compiles" do
    assert_raise ArgumentError, ~r/cluster/, fn ->
      Code.compile_string("defmodule Ottla.CaseTest.Bad do use Ottla.Case, cluster: :bogus end")
    end

    assert_raise ArgumentError, ~r/unknown keys \[:bogus\]/, fn ->
      Code.compile_string("defmodule Ottla.CaseTest.Bad2 do use Ottla.Case, bogus: 1 end")
    end
  end
end

defmodule Ottla.CasePerTestTest do
  use Ottla.Case, async: true, cluster: :test, brokers: 2, partitions: 2

  for n <- 1..2 do
    # With one cluster for the module, one of the two would list the other's topic too.
    test "a cluster of its own, #{n}", %{endpoints: endpoints, topic: topic} do
      assert {:ok, [{^topic, 2}]} = Ottla.list_topics(endpoints)
    end
  end
end
